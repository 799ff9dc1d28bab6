//! Presence across two instances sharing a Redis the test starts: the scenarios of
//! `presence.rs` with one user's connections spread over both instances, a graceful shutdown
//! that makes an instance's users leave at once, an instance killed with SIGKILL whose users
//! leave once its entries expire, a Redis that lost the entries getting them back, and the
//! entries' TTLs set by the joins that create them.

mod support;

use std::time::Duration;

use support::presence::{self as scenario, builder, close, expect_event, rtk1, wait_stats};
use support::redis_server::start_redis;
use support::{Server, serve_chat};

/// An instance on `url` whose `room*` topics track presence.
async fn instance(url: String, grace: Duration) -> Server {
    let service = builder(grace).redis_url(Some(url)).build();
    let server = serve_chat(service).await;
    support::wait_ready(&server.service).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_per_user_and_one_leave_after_the_last_across_instances() {
    let Some(redis) = start_redis("presence_one_join_per_user") else {
        return;
    };
    let a = instance(redis.url(), Duration::from_secs(5)).await;
    let b = instance(redis.url(), Duration::from_secs(5)).await;
    scenario::one_join_per_user_and_one_leave_after_the_last(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_opened_and_closed_at_once_on_both_instances_give_one_join_and_one_leave() {
    let Some(redis) = start_redis("presence_rush") else {
        return;
    };
    let a = instance(redis.url(), Duration::from_secs(5)).await;
    let b = instance(redis.url(), Duration::from_secs(5)).await;
    scenario::tabs_opened_and_closed_at_once_give_one_join_and_one_leave(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_leaves_after_the_grace_unless_it_reconnects_elsewhere() {
    let Some(redis) = start_redis("presence_grace") else {
        return;
    };
    let a = instance(redis.url(), Duration::from_secs(2)).await;
    let b = instance(redis.url(), Duration::from_secs(2)).await;
    scenario::a_dropped_connection_leaves_after_the_grace_unless_it_reconnects(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_topic_without_it_is_an_error_with_redis() {
    let Some(redis) = start_redis("presence_not_enabled") else {
        return;
    };
    let a = instance(redis.url(), Duration::from_secs(5)).await;
    scenario::presence_of_a_topic_without_it_is_an_error(&a).await;
}

/// The entries' TTL is the default minute: a leave seen within the test's bounded wait came
/// from the shutdown, not from the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_makes_the_instances_users_leave_at_once() {
    let Some(redis) = start_redis("presence_graceful_shutdown") else {
        return;
    };
    let a = instance(redis.url(), Duration::from_secs(5)).await;
    let b = instance(redis.url(), Duration::from_secs(5)).await;
    scenario::a_graceful_shutdown_leaves_at_once(&a, &b).await;
}

/// Redis restarts empty: each instance puts its entries back at its next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_redis_lost_are_put_back_by_the_next_renewal() {
    let Some(mut redis) = start_redis("presence_redis_lost") else {
        return;
    };
    let url = redis.url();
    let timing = |b: axum_realtime_kit::WebsocketServiceBuilder<_>| {
        b.presence_timing(Duration::from_millis(200), Duration::from_secs(2))
    };
    let a = serve_chat(
        timing(builder(Duration::from_secs(5)))
            .redis_url(Some(url.clone()))
            .build(),
    )
    .await;
    support::wait_ready(&a.service).await;
    let topic = "room-lost";
    let mut obs = rtk1(a.addr, topic, "obs").await;
    expect_event(&mut obs, "join", topic, "obs").await;
    let _alice = rtk1(a.addr, topic, "alice").await;
    expect_event(&mut obs, "join", topic, "alice").await;
    wait_stats(&a.service, topic, 2, 2).await;

    redis.restart();
    support::wait_ready(&a.service).await;
    wait_stats(&a.service, topic, 2, 2).await;
}

/// Two `basic_chat` processes on one Redis, entries living 1.5 s: the instance killed with
/// SIGKILL has its user leave, seen on the other, whose users stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_with_sigkill_has_its_users_leave_once_its_entries_expire() {
    let Some(redis) = start_redis("presence_sigkill") else {
        return;
    };
    scenario::a_killed_instances_users_leave(redis.url(), support::WAIT).await;
}

/// Every presence key Redis holds for `topic` expires (a PTTL above 0); the test names its
/// topics so that only presence keys contain `:p:`.
async fn every_presence_key_expires(r: &mut redis::aio::MultiplexedConnection, topic: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{topic}*:p:*"))
        .query_async(r)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no presence keys for {topic}");
    for key in keys {
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query_async(r).await.unwrap();
        assert!(pttl > 0, "{key} has PTTL {pttl}");
    }
}

/// How many `PEXPIRE` Redis ran since its statistics were reset.
async fn pexpires(r: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(r)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_pexpire:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// A join into a topic whose entries were just renewed sets no TTL; every key a join creates
/// (the topic's first entry, or the first of an instance) gets one, also after the topic
/// emptied and filled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_sets_ttls_only_on_the_keys_it_creates() {
    let Some(redis) = start_redis("presence_ttls") else {
        return;
    };
    let mut r = redis.client().await;
    let a = instance(redis.url(), Duration::from_secs(5)).await;
    let b = instance(redis.url(), Duration::from_secs(5)).await;
    let topic = "room-ttl";

    let alice = rtk1(a.addr, topic, "alice").await;
    wait_stats(&a.service, topic, 1, 1).await;
    every_presence_key_expires(&mut r, topic).await;

    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut r)
        .await
        .unwrap();
    let bob = rtk1(a.addr, topic, "bob").await;
    let alice_again = rtk1(a.addr, topic, "alice").await;
    wait_stats(&a.service, topic, 2, 3).await;
    assert_eq!(
        pexpires(&mut r).await,
        0,
        "joins into live entries renewed TTLs"
    );

    // The first connection on `b`: its own hash is new.
    let carol = rtk1(b.addr, topic, "carol").await;
    wait_stats(&a.service, topic, 3, 4).await;
    every_presence_key_expires(&mut r, topic).await;

    // `b` empties (its hash goes) and fills again.
    close(carol).await;
    wait_stats(&a.service, topic, 2, 3).await;
    let dave = rtk1(b.addr, topic, "dave").await;
    wait_stats(&a.service, topic, 3, 4).await;
    every_presence_key_expires(&mut r, topic).await;

    // The topic empties (every key goes) and fills again.
    for c in [alice, bob, alice_again, dave] {
        close(c).await;
    }
    wait_stats(&a.service, topic, 0, 0).await;
    let _erin = rtk1(a.addr, topic, "erin").await;
    wait_stats(&a.service, topic, 1, 1).await;
    every_presence_key_expires(&mut r, topic).await;
}
