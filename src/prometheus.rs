//! The runtime's metrics in Prometheus' text format (feature `prometheus`).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use axum::{Router, routing::get};
//! # use axum_realtime_kit::prelude::*;
//! # fn demo<H: MessageHandler>(service: Arc<WebsocketService<H>>) {
//! use axum_realtime_kit::prometheus::Prometheus;
//!
//! let prometheus = Prometheus::install().expect("no other metrics recorder installed");
//! let app: Router = Router::new().route("/metrics", prometheus.handler(service));
//! # }
//! ```
//!
//! [`Prometheus::install`] makes a Prometheus recorder the process's global [`metrics`]
//! recorder, so whatever else the application records through the `metrics` macros is served
//! beside the runtime's `rtk_*` series.

use std::sync::{Arc, OnceLock};

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::handler::MessageHandler;
use crate::service::WebsocketService;

/// The handle installed by the first successful [`Prometheus::install`] of this process.
static INSTALLED: OnceLock<PrometheusHandle> = OnceLock::new();

/// Renders what the process recorded through [`metrics`] in Prometheus' text format.
#[derive(Clone)]
pub struct Prometheus {
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus").finish_non_exhaustive()
    }
}

/// Why [`Prometheus::install`] failed.
#[derive(Debug)]
pub struct InstallError(String);

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot install the Prometheus recorder: {}", self.0)
    }
}

impl std::error::Error for InstallError {}

impl Prometheus {
    /// Installs a Prometheus recorder as the process's global `metrics` recorder.
    ///
    /// Calling it again returns the same recorder, so several services (or tests) in one
    /// process can each ask for it. It fails only if a different recorder was installed first.
    pub fn install() -> Result<Self, InstallError> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = INSTALLED.get() {
            return Ok(Self {
                handle: handle.clone(),
            });
        }
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| InstallError(e.to_string()))?;
        Ok(Self {
            handle: INSTALLED.get_or_init(|| handle).clone(),
        })
    }

    /// Everything recorded so far, in the text exposition format.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// A `GET` route serving [`render`](Self::render), after reporting `service`'s current
    /// values (so a scrape never sees values up to a second old).
    pub fn handler<H, S>(&self, service: Arc<WebsocketService<H>>) -> MethodRouter<S>
    where
        H: MessageHandler,
        S: Clone + Send + Sync + 'static,
    {
        let this = self.clone();
        get(move || {
            let this = this.clone();
            let service = service.clone();
            async move {
                service.export_metrics();
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    this.render(),
                )
                    .into_response()
            }
        })
    }
}
