//! The public face of the runtime, at the module paths of 0.1.0: [`handler`] (the trait you
//! implement), [`service`] (the engine handle), [`upgrade`] (the axum handler) and [`types`].

pub mod handler;
pub mod service;
pub mod types;
pub mod upgrade;
