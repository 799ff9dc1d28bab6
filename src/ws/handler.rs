//! [`MessageHandler`]: the trait that holds your application's logic.
//!
//! The service calls it for every connection: [`on_connect`](MessageHandler::on_connect) once the
//! connection is subscribed to its topic, then for each parsed client message first
//! [`handle_direct_message`](MessageHandler::handle_direct_message) and — only when that returns
//! `Ok(None)` — [`handle_broadcast_message`](MessageHandler::handle_broadcast_message), and finally
//! [`on_disconnect`](MessageHandler::on_disconnect), exactly once, however the connection ended.

pub use crate::handler::{ConnectionContext, HandlerError, MessageHandler, decode_json};
