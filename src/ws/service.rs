//! [`WebsocketService`]: the handle to one instance of the runtime, and its builder.

pub use crate::outbound::SlowConsumerPolicy;
pub use crate::service::{BuildError, WebsocketService, WebsocketServiceBuilder};
