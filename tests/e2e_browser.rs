//! End to end, in real browsers: headless Chromium pages, driven through chromedriver, use the
//! examples' own web pages against example processes that share a private Redis.
//!
//! Needs `/usr/bin/chromium`, `/usr/bin/chromedriver` and `redis-server`; without them the tests
//! say SKIPPED and pass, unless `RTK_REQUIRE_BROWSER=1` / `RTK_REQUIRE_REDIS=1` (set by `.ci/run`).
//! `RTK_E2E_SCREENSHOTS=<dir>` saves a screenshot of each page there.

mod support;

use serde_json::{Value, json};
use support::browser::*;
use support::free_port;
use support::redis_server::{RedisServer, start_redis};

/// The chat messages a page shows, as `[username, text]` pairs.
const MESSAGES: &str = "return Array.from(document.querySelectorAll('#messages li.msg'))\
     .map(li => [li.querySelector('.user').textContent, li.querySelector('.text').textContent]);";

/// Opens the chat page of the instance on `port` and joins `room` as `name`.
fn join(page: &Session, port: u16, name: &str, room: &str) {
    page.goto(&format!("http://127.0.0.1:{port}/"));
    switch(page, name, room);
}

/// Joins `room` as `name` from the page as it is; returns once the page says it is connected
/// (the server answered its first Ping, so the connection is subscribed).
fn switch(page: &Session, name: &str, room: &str) {
    let input = page.find("#name");
    page.clear(&input);
    page.type_into(&input, name);
    page.execute(
        "document.getElementById('room').value = arguments[0];",
        json!([room]),
    );
    page.click(&page.find("#connect"));
    page.wait_for(
        &format!("{name}'s page connected to {room}"),
        "return document.body.dataset.state === 'ready';",
    );
}

/// Two processes of example `name` sharing a private Redis, for the length of one test.
struct TwoInstances {
    ports: (u16, u16),
    // Dropped in this order: the processes, then the lock, then Redis.
    _two: Process,
    one: Option<Process>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
    _redis: RedisServer,
}

/// Starts [`TwoInstances`] of `example`; `None` (the test says SKIPPED) without a browser or
/// `redis-server`, unless `.ci/run` requires them.
fn two_instances(test: &str, example: &str) -> Option<TwoInstances> {
    if !browser_available(test) {
        return None;
    }
    let redis = start_redis(test)?;
    let one_at_a_time = exclusive();
    let url = redis.url();
    let (p1, p2) = (free_port(), free_port());
    // A killed instance's users leave the others' presence within 2 s.
    let env = [("REDIS_URL", url.as_str()), ("PRESENCE_TTL_MS", "2000")];
    let one = start_example(example, p1, &env);
    let two = start_example(example, p2, &env);
    Some(TwoInstances {
        ports: (p1, p2),
        _two: two,
        one: Some(one),
        _one_at_a_time: one_at_a_time,
        _redis: redis,
    })
}

impl TwoInstances {
    /// Kills the first instance (SIGKILL: no close frames, no goodbye to Redis).
    fn kill_first(&mut self) {
        drop(self.one.take());
    }
}

/// Waits until `page`'s online list shows exactly `names`.
fn wait_online(page: &Session, who: &str, names: &[&str]) {
    let want = serde_json::to_string(names).unwrap();
    page.wait_for(
        &format!("{who} lists {want} online"),
        &format!(
            "return JSON.stringify(Array.from(document.querySelectorAll('#users li'))\
             .map(li => li.firstChild.textContent).sort()) === {want:?};"
        ),
    );
}

/// Waits until `page` shows a message `text` from `user`.
fn wait_message(page: &Session, who: &str, user: &str, text: &str) {
    poll(
        &format!("{who} to show {user}: {text:?}"),
        BROWSER_WAIT,
        || {
            let shown = page.execute(MESSAGES, json!([]));
            shown
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m[0] == user && m[1] == text)
                .then_some(())
        },
    );
}

fn screenshot(page: &Session, name: &str) {
    if let Some(dir) = screenshot_dir() {
        std::fs::create_dir_all(&dir).unwrap();
        page.screenshot(&dir.join(name));
    }
}

#[test]
fn a_message_typed_in_one_browser_appears_in_another_through_redis() {
    let Some(instances) = two_instances(
        "a_message_typed_in_one_browser_appears_in_another_through_redis",
        "basic_chat",
    ) else {
        return;
    };
    let (p1, p2) = instances.ports;

    let driver = ChromeDriver::start();
    let alice = driver.new_session();
    let bob = driver.new_session();
    join(&alice, p1, "alice", "general");
    join(&bob, p2, "bob", "general");

    // Typed on instance 1, Enter: shown on instance 2 (and to the sender). Markup stays text.
    let hello = "Hello from instance 1 <b>not bold</b> & \"quoted\"";
    alice.type_into(&alice.find("#text"), &format!("{hello}{ENTER}"));
    wait_message(&bob, "bob's page", "alice", hello);
    wait_message(&alice, "alice's page", "alice", hello);
    let injected = bob.execute(
        "return document.querySelectorAll('#messages b').length;",
        json!([]),
    );
    assert_eq!(injected, 0, "message text was parsed as HTML");

    // The other way, with the Send button.
    bob.type_into(&bob.find("#text"), "Hi Alice, from instance 2");
    bob.click(&bob.find("#send"));
    wait_message(&alice, "alice's page", "bob", "Hi Alice, from instance 2");
    wait_message(&bob, "bob's page", "bob", "Hi Alice, from instance 2");
    let text_left = bob.execute("return document.getElementById('text').value;", json!([]));
    assert_eq!(text_left, "", "the input is cleared after sending");

    // POST /broadcast on instance 2 reaches the page on instance 1, verbatim.
    let token = "b1b2b3b4-a1a2-b1b2-c1c2-c3c4c5c6c7c8:ops";
    let body = br#"{"NewMessage":{"room":"general","username":"ops","text":"Deploy at 17:00"}}"#;
    let (status, _) = http(
        p2,
        "POST",
        "/broadcast/general",
        &[("Authorization", &format!("Bearer {token}"))],
        Some(body),
    )
    .unwrap();
    assert_eq!(status, 202);
    wait_message(&alice, "alice's page", "ops", "Deploy at 17:00");
    wait_message(&bob, "bob's page", "ops", "Deploy at 17:00");
    let notice = br#"{"notice":"maintenance <i>tonight</i>"}"#;
    let (status, _) = http(
        p1,
        "POST",
        &format!("/broadcast/general?token={token}"),
        &[],
        Some(notice),
    )
    .unwrap();
    assert_eq!(status, 202);
    bob.wait_for(
        "bob's page to show the raw notice",
        "return Array.from(document.querySelectorAll('#messages li.raw'))\
         .some(li => li.textContent.includes('maintenance <i>tonight</i>'));",
    );

    // Bob moves to #random: messages to #general no longer reach him.
    switch(&bob, "bob", "random");
    alice.type_into(&alice.find("#text"), &format!("only for general{ENTER}"));
    wait_message(&alice, "alice's page", "alice", "only for general");
    bob.type_into(&bob.find("#text"), &format!("anyone in random?{ENTER}"));
    wait_message(&bob, "bob's page", "bob", "anyone in random?");
    let bob_saw: Value = bob.execute(MESSAGES, json!([]));
    assert!(
        !bob_saw
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m[1] == "only for general"),
        "bob got a #general message in #random: {bob_saw}"
    );

    screenshot(&alice, "chat-alice.png");
    screenshot(&bob, "chat-bob.png");
}

#[test]
fn a_page_whose_instance_dies_reconnects_to_the_other_and_misses_nothing() {
    let Some(mut instances) = two_instances(
        "a_page_whose_instance_dies_reconnects_to_the_other_and_misses_nothing",
        "basic_chat",
    ) else {
        return;
    };
    let (p1, p2) = instances.ports;

    let driver = ChromeDriver::start();
    let alice = driver.new_session();
    let bob = driver.new_session();
    // Alice's page knows both instances and starts on the first.
    alice.goto(&format!(
        "http://127.0.0.1:{p1}/?servers=ws://127.0.0.1:{p1}/ws,ws://127.0.0.1:{p2}/ws"
    ));
    switch(&alice, "alice", "general");
    join(&bob, p2, "bob", "general");
    // Carol's page knows only the first instance.
    let carol = driver.new_session();
    join(&carol, p1, "carol", "general");
    alice.type_into(&alice.find("#text"), &format!("before{ENTER}"));
    wait_message(&bob, "bob's page", "alice", "before");
    // Every page lists everyone, whichever instance they are on.
    for (who, page) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
        wait_online(page, who, &["alice", "bob", "carol"]);
    }

    // Instance 1 dies; 30 messages are published on instance 2 before Alice's page can be back
    // (its first retry waits at least 250 ms).
    instances.kill_first();
    let token = "b1b2b3b4-a1a2-b1b2-c1c2-c3c4c5c6c7c8:ops";
    let sent: Vec<String> = (1..=30).map(|i| format!("missed {i}")).collect();
    for text in &sent {
        let body = json!({"NewMessage": {"room": "general", "username": "ops", "text": text}});
        let (status, _) = http(
            p2,
            "POST",
            "/broadcast/general",
            &[("Authorization", &format!("Bearer {token}"))],
            Some(body.to_string().as_bytes()),
        )
        .unwrap();
        assert_eq!(status, 202);
    }

    // The page reconnects to instance 2 by itself and recovers them: each once, in order.
    wait_message(&alice, "alice's page", "ops", "missed 30");
    alice.wait_for(
        "alice's page connected again",
        "return document.body.dataset.state === 'ready';",
    );
    let shown: Vec<(String, String)> =
        serde_json::from_value(alice.execute(MESSAGES, json!([]))).unwrap();
    let texts: Vec<&str> = shown
        .iter()
        .filter(|(user, _)| user == "ops")
        .map(|(_, text)| text.as_str())
        .collect();
    assert_eq!(texts, sent, "alice's page after the reconnect: {shown:?}");
    let recovered = alice.execute(
        "return Array.from(document.querySelectorAll('#messages li.system'))\
         .some(li => li.textContent.includes('nothing was missed'));",
        json!([]),
    );
    assert_eq!(recovered, true, "the page did not recover: {shown:?}");
    // Carol went down with the first instance and leaves once its entries expire; Alice, back
    // on the second, never left.
    for (who, page) in [("alice", &alice), ("bob", &bob)] {
        wait_online(page, who, &["alice", "bob"]);
    }

    // Live again, both ways, through the surviving instance.
    alice.type_into(&alice.find("#text"), &format!("back{ENTER}"));
    wait_message(&bob, "bob's page", "alice", "back");
    bob.type_into(&bob.find("#text"), &format!("welcome back{ENTER}"));
    wait_message(&alice, "alice's page", "bob", "welcome back");
    screenshot(&alice, "chat-recovered.png");
}

#[test]
fn a_browser_negotiates_permessage_deflate_and_chats_compressed() {
    let Some(instances) = two_instances(
        "a_browser_negotiates_permessage_deflate_and_chats_compressed",
        "basic_chat",
    ) else {
        return;
    };
    let (p1, p2) = instances.ports;

    let driver = ChromeDriver::start();
    let alice = driver.new_session();
    let bob = driver.new_session();
    join(&alice, p1, "alice", "general");
    join(&bob, p2, "bob", "general");
    // Chromium offers permessage-deflate; the example accepts it.
    for (who, page) in [("alice", &alice), ("bob", &bob)] {
        let agreed = page.execute("return document.body.dataset.extensions;", json!([]));
        let agreed = agreed.as_str().unwrap_or_default();
        assert!(
            agreed.starts_with("permessage-deflate")
                && agreed.contains("server_no_context_takeover")
                && agreed.contains("client_no_context_takeover"),
            "{who}'s page agreed {agreed:?}"
        );
    }
    // Long enough that the broadcast is compressed (and Chromium compresses what it sends).
    let long = "Release notes: the ingest service now batches writes, dashboards refresh \
                twice as fast, and the on-call rotation moves to Mondays. "
        .repeat(3);
    alice.type_into(&alice.find("#text"), &format!("{long}{ENTER}"));
    wait_message(&bob, "bob's page", "alice", &long);
    wait_message(&alice, "alice's page", "alice", &long);
    bob.type_into(&bob.find("#text"), &format!("short one{ENTER}"));
    wait_message(&alice, "alice's page", "bob", "short one");
}

#[test]
fn the_dashboard_charts_every_instance_live() {
    let Some(instances) =
        two_instances("the_dashboard_charts_every_instance_live", "live_dashboard")
    else {
        return;
    };
    let (p1, p2) = instances.ports;

    let driver = ChromeDriver::start();
    let page = driver.new_session();
    page.goto(&format!("http://127.0.0.1:{p1}/"));
    // Samples from both instances arrive (500 ms apart each), through Redis.
    let instances = page.wait_for(
        "samples from both instances",
        "const d = window.dashboard;\
         return d && d.samples >= 8 && d.instances.length === 2 ? d.instances : null;",
    );
    let mut instances: Vec<String> = serde_json::from_value(instances).unwrap();
    instances.sort();
    let mut expected = vec![format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}")];
    expected.sort();
    assert_eq!(instances, expected);
    // The page's own connection is counted.
    page.wait_for(
        "the connection count headline",
        "return document.querySelector('#grid .card:nth-child(3) .value').textContent\
         .startsWith('1');",
    );
    screenshot(&page, "dashboard.png");
    // Each chart has lines drawn in both instances' colours.
    for chart in ["cpu", "rss", "conns", "deliveries"] {
        let counts = page.execute(
            "const c = document.getElementById(arguments[0]);\
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;\
             const near = (i, r, g, b) => Math.abs(d[i] - r) + Math.abs(d[i+1] - g)\
                 + Math.abs(d[i+2] - b) < 40 && d[i+3] > 200;\
             let blue = 0, pink = 0;\
             for (let i = 0; i < d.length; i += 4) {\
               if (near(i, 0x60, 0xa5, 0xfa)) blue++;\
               if (near(i, 0xf4, 0x72, 0xb6)) pink++;\
             }\
             return [blue, pink];",
            json!([format!("chart-{chart}")]),
        );
        let (blue, pink) = (counts[0].as_u64().unwrap(), counts[1].as_u64().unwrap());
        // Lines may overlap (both instances idle at 0% CPU), but something is drawn, and the
        // connection counts differ (1 on the first instance, 0 on the second).
        assert!(
            blue + pink > 30,
            "chart {chart}: {blue} + {pink} line pixels"
        );
        if chart == "conns" {
            assert!(blue > 30 && pink > 30, "chart {chart}: {blue} and {pink}");
        }
    }
}
