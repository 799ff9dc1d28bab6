//! Each connection runs inside a `ws` span naming its id, topic and user, and nothing is logged
//! per delivered message at `INFO` or above.

mod support;

use std::sync::{Arc, Mutex};

use support::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Default)]
struct Seen {
    /// (name, "field=value" pairs) of every span created.
    spans: Vec<(String, Vec<String>)>,
    /// Events at INFO or above.
    loud_events: usize,
}

struct Record(Arc<Mutex<Seen>>);

struct Fields(Vec<String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push(format!("{}={value:?}", field.name()));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Record {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        let mut fields = Fields(Vec::new());
        attrs.record(&mut fields);
        let name = attrs.metadata().name().to_string();
        self.0.lock().unwrap().spans.push((name, fields.0));
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() <= Level::INFO {
            self.0.lock().unwrap().loud_events += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_has_a_span_and_deliveries_log_nothing_loud() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let subscriber = tracing_subscriber::registry().with(Record(seen.clone()));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = chat_server(2).await;
    let mut alice = connect(server.addr, "general", ALICE).await;
    let mut bob = connect(server.addr, "general", BOB).await;
    let loud_before = seen.lock().unwrap().loud_events;
    for i in 0..200 {
        alice
            .send_text(&send_message("general", &format!("m{i}")))
            .await;
    }
    for c in [&mut alice, &mut bob] {
        for i in 0..200 {
            assert_eq!(c.recv_json().await["NewMessage"]["text"], format!("m{i}"));
        }
    }
    assert_eq!(
        seen.lock().unwrap().loud_events,
        loud_before,
        "400 deliveries logged at INFO or above"
    );

    let seen = seen.lock().unwrap();
    let ws: Vec<_> = seen.spans.iter().filter(|(name, _)| name == "ws").collect();
    assert_eq!(
        ws.len(),
        2,
        "one `ws` span per connection: {:?}",
        seen.spans
    );
    for (_, fields) in &ws {
        for key in ["conn_id=", "topic=general", "user="] {
            assert!(
                fields.iter().any(|f| f.starts_with(key)),
                "span fields {fields:?} lack {key}"
            );
        }
    }
}
