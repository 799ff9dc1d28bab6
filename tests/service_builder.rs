//! The builder: what it prints, and how it reports configuration it cannot use.

mod support;

use support::chat;

#[test]
fn the_builders_debug_does_not_print_the_redis_password() {
    for url in ["redis://user:secret@host/", "redis://:secret@host:6380/0"] {
        let builder = chat::builder().redis_url(Some(url));
        let printed = format!("{builder:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("host"), "{printed}");
        let printed = format!("{builder:#?}");
        assert!(!printed.contains("secret"), "{printed}");
    }
}

#[tokio::test]
async fn a_build_error_does_not_print_the_redis_password() {
    let err = chat::builder()
        .redis_url(Some("rediss://user:secret@host/#insecure"))
        .try_build()
        .expect_err("skipping certificate checks is refused");
    for printed in [err.to_string(), format!("{err:?}")] {
        assert!(!printed.contains("secret"), "{printed}");
    }
}
