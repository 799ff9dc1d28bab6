//! Presence on one instance (in-process broker): who is in a topic, `join` when a user's first
//! connection arrives and `leave` when their last one left, the grace after a dropped
//! connection, and the error for a topic without presence. The same scenarios run on two
//! instances sharing a Redis in `presence_redis.rs`.

mod support;

use std::time::Duration;

use support::presence::{self as scenario, builder};
use support::{Server, serve_chat};

async fn instance(grace: Duration) -> Server {
    serve_chat(builder(grace).build()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_per_user_and_one_leave_after_the_last() {
    let a = instance(Duration::from_secs(5)).await;
    scenario::one_join_per_user_and_one_leave_after_the_last(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_leaves_after_the_grace_unless_it_reconnects() {
    let a = instance(Duration::from_secs(2)).await;
    scenario::a_dropped_connection_leaves_after_the_grace_unless_it_reconnects(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_topic_without_it_is_an_error() {
    let a = instance(Duration::from_secs(5)).await;
    scenario::presence_of_a_topic_without_it_is_an_error(&a).await;
}
