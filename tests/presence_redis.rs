//! Presence across two instances sharing a Redis the test starts: the scenarios of
//! `presence.rs` with one user's connections spread over both instances, a graceful shutdown
//! that makes an instance's users leave at once, an instance killed with SIGKILL whose users
//! leave once its entries expire, and a Redis that lost the entries getting them back.

mod support;

use std::time::Duration;

use support::presence::{self as scenario, builder, expect_event, rtk1, wait_stats};
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
