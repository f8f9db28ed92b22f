//! Logs, traces and metrics of a Driftline process (agent or collector).
//!
//! Both binaries call [`init`] once at start-up. It always installs the log
//! formatter on stderr (`RUST_LOG` filters it). With the `otel` feature
//! (on by default) it also exports OpenTelemetry over OTLP/HTTP when the
//! standard variables ask for it:
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | base URL (`http://host:4318`); `/v1/traces`, `/v1/metrics` and `/v1/logs` are appended |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._METRICS_ENDPOINT`, `..._LOGS_ENDPOINT` | one signal only, full URL |
//! | `OTEL_EXPORTER_OTLP_HEADERS` (and per signal) | e.g. `authorization=Bearer x` |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | only `http/protobuf` (the default) is built in |
//! | `OTEL_EXPORTER_OTLP_TIMEOUT` | milliseconds per export, default 10000 |
//! | `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`, `OTEL_LOGS_EXPORTER` | `none` switches a signal off |
//! | `OTEL_SDK_DISABLED=true` | switches all off |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | resource attributes |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BLRP_SCHEDULE_DELAY`, `OTEL_METRIC_EXPORT_INTERVAL` | export pacing |
//!
//! Traces are the process's `tracing` spans (`tracing-opentelemetry`).
//! Logs are its `tracing` events (`opentelemetry-appender-tracing`),
//! Driftline's own at info and up, whatever `RUST_LOG` says about stderr.
//! Metrics are whatever the code records through the `metrics` facade
//! (`metrics::counter!` and friends): [`init`] installs one recorder that
//! hands every value both to the process's own exporter (the collector's
//! Prometheus `/metrics`) and to OpenTelemetry. So a metric is declared once,
//! where it happens, and shows up on both paths under the same name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tracing_subscriber::Layer as _;

/// The process's own metrics exporter, if it has one (the collector's
/// Prometheus recorder).
pub type LocalRecorder = Box<dyn Recorder + Send + Sync>;

/// What [`init`] started; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    #[cfg(feature = "otel")]
    otel: otel::Providers,
}

impl Telemetry {
    /// Which OpenTelemetry signals are exported, e.g. `["traces"]`.
    pub fn exporting(&self) -> Vec<&'static str> {
        #[cfg(feature = "otel")]
        {
            self.otel.exporting()
        }
        #[cfg(not(feature = "otel"))]
        Vec::new()
    }

    /// Exports what is still buffered (spans, a last metrics reading) and
    /// stops the exporters. Call it before the process exits.
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        self.otel.shutdown();
    }
}

/// Sets up logging, the metrics recorder and, when configured, OpenTelemetry.
/// Runs a program: telemetry ([`init`]) around `work` on a multi-threaded
/// Tokio runtime, flushed before the exit code is returned; an error is
/// printed as one line on stderr and exits with status 1. Every Driftline
/// program's `main` is this call.
pub fn run_program(
    service: &'static str,
    default_filter: &str,
    local: Option<LocalRecorder>,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    use anyhow::Context as _;
    let telemetry = match init(service, default_filter, local) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: telemetry: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !telemetry.exporting().is_empty() {
        tracing::info!(signals = ?telemetry.exporting(), "exporting OpenTelemetry over OTLP");
    }
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(work));
    telemetry.shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `service` names the process (`driftline-agent`); `default_filter` is the
/// log filter when `RUST_LOG` is unset. Call it once per process.
pub fn init(
    service: &'static str,
    default_filter: &str,
    local: Option<LocalRecorder>,
) -> anyhow::Result<Telemetry> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    #[cfg(feature = "otel")]
    {
        let providers = otel::Providers::from_env(service)?;
        // Driftline's own spans (info and up) go to OpenTelemetry whatever
        // RUST_LOG says about logs; the libraries' internal spans (HTTP,
        // MQTT, query engine) stay out of the traces.
        let ours = || {
            tracing_subscriber::filter::Targets::new()
                .with_target("driftline_agent", tracing::Level::INFO)
                .with_target("driftline_collector", tracing::Level::INFO)
                .with_target("driftline_pipeline", tracing::Level::INFO)
                .with_target("driftline_sim", tracing::Level::INFO)
                .with_target("driftline_runtime", tracing::Level::INFO)
        };
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(providers.tracing_layer().with_filter(ours()))
            .with(providers.logs_layer().with_filter(ours()))
            .try_init()?;
        install_recorder(Bridge::new(local, providers.meter()))?;
        Ok(Telemetry { otel: providers })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = service;
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .try_init()?;
        install_recorder(Bridge::new(local))?;
        Ok(Telemetry {})
    }
}

fn install_recorder(bridge: Bridge) -> anyhow::Result<()> {
    if bridge.is_empty() {
        return Ok(());
    }
    metrics::set_global_recorder(bridge)
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))
}

/// The one `metrics` recorder: forwards each value to the local exporter
/// and to OpenTelemetry. Handles are kept per key, so a counter set with
/// `absolute` (a copy of an atomic the ingest path bumps) turns into the
/// right increments for OpenTelemetry's monotonic counter.
struct Bridge {
    local: Option<LocalRecorder>,
    #[cfg(feature = "otel")]
    meter: Option<opentelemetry::metrics::Meter>,
    counters: Mutex<HashMap<Key, Arc<BridgedCounter>>>,
    gauges: Mutex<HashMap<Key, Arc<BridgedGauge>>>,
    histograms: Mutex<HashMap<Key, Arc<BridgedHistogram>>>,
}

impl Bridge {
    fn new(
        local: Option<LocalRecorder>,
        #[cfg(feature = "otel")] meter: Option<opentelemetry::metrics::Meter>,
    ) -> Self {
        Self {
            local,
            #[cfg(feature = "otel")]
            meter,
            counters: Mutex::default(),
            gauges: Mutex::default(),
            histograms: Mutex::default(),
        }
    }

    fn is_empty(&self) -> bool {
        #[cfg(feature = "otel")]
        let otel = self.meter.is_some();
        #[cfg(not(feature = "otel"))]
        let otel = false;
        self.local.is_none() && !otel
    }

    /// The handle for `key`, made on first use.
    fn handle<T>(map: &Mutex<HashMap<Key, Arc<T>>>, key: &Key, make: impl FnOnce() -> T) -> Arc<T> {
        // A poisoned map only means another thread panicked mid-insert; the
        // map itself is still consistent.
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }
}

#[cfg(feature = "otel")]
fn attributes(key: &Key) -> Vec<opentelemetry::KeyValue> {
    key.labels()
        .map(|l| opentelemetry::KeyValue::new(l.key().to_owned(), l.value().to_owned()))
        .collect()
}

impl Recorder for Bridge {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(local) = &self.local {
            local.describe_counter(key, unit, description);
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(local) = &self.local {
            local.describe_gauge(key, unit, description);
        }
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(local) = &self.local {
            local.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        Counter::from_arc(Self::handle(&self.counters, key, || BridgedCounter {
            local: self
                .local
                .as_ref()
                .map(|l| l.register_counter(key, metadata)),
            #[cfg(feature = "otel")]
            otel: self.meter.as_ref().map(|m| {
                (
                    m.u64_counter(key.name().to_owned()).build(),
                    attributes(key),
                )
            }),
            total: AtomicU64::new(0),
        }))
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Self::handle(&self.gauges, key, || BridgedGauge {
            local: self.local.as_ref().map(|l| l.register_gauge(key, metadata)),
            #[cfg(feature = "otel")]
            otel: self
                .meter
                .as_ref()
                .map(|m| (m.f64_gauge(key.name().to_owned()).build(), attributes(key))),
            bits: AtomicU64::new(0f64.to_bits()),
        }))
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Self::handle(&self.histograms, key, || BridgedHistogram {
            local: self
                .local
                .as_ref()
                .map(|l| l.register_histogram(key, metadata)),
            #[cfg(feature = "otel")]
            otel: self.meter.as_ref().map(|m| {
                (
                    m.f64_histogram(key.name().to_owned()).build(),
                    attributes(key),
                )
            }),
        }))
    }
}

struct BridgedCounter {
    local: Option<Counter>,
    #[cfg(feature = "otel")]
    otel: Option<(
        opentelemetry::metrics::Counter<u64>,
        Vec<opentelemetry::KeyValue>,
    )>,
    /// The running total, to turn `absolute` into an increment.
    total: AtomicU64,
}

impl BridgedCounter {
    fn add(&self, delta: u64) {
        #[cfg(feature = "otel")]
        if let (Some((counter, attrs)), true) = (&self.otel, delta > 0) {
            counter.add(delta, attrs);
        }
        #[cfg(not(feature = "otel"))]
        let _ = delta;
    }
}

impl CounterFn for BridgedCounter {
    fn increment(&self, value: u64) {
        if let Some(local) = &self.local {
            local.increment(value);
        }
        self.total.fetch_add(value, Ordering::Relaxed);
        self.add(value);
    }

    fn absolute(&self, value: u64) {
        if let Some(local) = &self.local {
            local.absolute(value);
        }
        let before = self.total.fetch_max(value, Ordering::Relaxed);
        self.add(value.saturating_sub(before));
    }
}

struct BridgedGauge {
    local: Option<Gauge>,
    #[cfg(feature = "otel")]
    otel: Option<(
        opentelemetry::metrics::Gauge<f64>,
        Vec<opentelemetry::KeyValue>,
    )>,
    bits: AtomicU64,
}

impl BridgedGauge {
    /// Applies `f` to the current value and reports the result.
    fn update(&self, f: impl Fn(f64) -> f64) {
        let mut now = 0.0;
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                now = f(f64::from_bits(bits));
                Some(now.to_bits())
            });
        #[cfg(feature = "otel")]
        if let Some((gauge, attrs)) = &self.otel {
            gauge.record(now, attrs);
        }
    }
}

impl GaugeFn for BridgedGauge {
    fn increment(&self, value: f64) {
        if let Some(local) = &self.local {
            local.increment(value);
        }
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        if let Some(local) = &self.local {
            local.decrement(value);
        }
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        if let Some(local) = &self.local {
            local.set(value);
        }
        self.update(|_| value);
    }
}

struct BridgedHistogram {
    local: Option<Histogram>,
    #[cfg(feature = "otel")]
    otel: Option<(
        opentelemetry::metrics::Histogram<f64>,
        Vec<opentelemetry::KeyValue>,
    )>,
}

impl HistogramFn for BridgedHistogram {
    fn record(&self, value: f64) {
        if let Some(local) = &self.local {
            local.record(value);
        }
        #[cfg(feature = "otel")]
        if let Some((histogram, attrs)) = &self.otel {
            histogram.record(value, attrs);
        }
    }
}

#[cfg(feature = "otel")]
mod otel {
    //! The OpenTelemetry SDK set up from the `OTEL_*` variables.

    use std::time::Duration;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    use opentelemetry_sdk::logs::SdkLoggerProvider;
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;

    pub(super) struct Providers {
        traces: Option<SdkTracerProvider>,
        metrics: Option<SdkMeterProvider>,
        logs: Option<SdkLoggerProvider>,
    }

    fn var(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }

    /// Whether `signal` ("TRACES", "METRICS" or "LOGS") is to be exported.
    fn wanted(signal: &str) -> anyhow::Result<bool> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(false);
        }
        match var(&format!("OTEL_{signal}_EXPORTER")).as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(false),
            Some(other) => {
                anyhow::bail!("OTEL_{signal}_EXPORTER={other} is not supported; use otlp or none")
            }
        }
        let endpoint = var(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        if endpoint.is_none() {
            return Ok(false);
        }
        let protocol = var(&format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        match protocol.as_deref() {
            None | Some("http/protobuf") => Ok(true),
            Some(other) => anyhow::bail!(
                "OTLP protocol {other} is not built in; use http/protobuf \
                 (an OpenTelemetry Collector listens for it on port 4318)"
            ),
        }
    }

    fn resource(service: &'static str) -> Resource {
        let mut builder = Resource::builder()
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        // OTEL_SERVICE_NAME, when set, wins (the builder already read it).
        if var("OTEL_SERVICE_NAME").is_none() {
            builder = builder.with_service_name(service);
        }
        builder.build()
    }

    impl Providers {
        pub(super) fn from_env(service: &'static str) -> anyhow::Result<Self> {
            let (want_traces, want_metrics, want_logs) =
                (wanted("TRACES")?, wanted("METRICS")?, wanted("LOGS")?);
            if !want_traces && !want_metrics && !want_logs {
                return Ok(Self {
                    traces: None,
                    metrics: None,
                    logs: None,
                });
            }
            let resource = resource(service);
            let traces = if want_traces {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(UreqClient::new())
                    .with_timeout(timeout())
                    .build()?;
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.clone())
                        .build(),
                )
            } else {
                None
            };
            let metrics = if want_metrics {
                let exporter = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_http_client(UreqClient::new())
                    .with_timeout(timeout())
                    .build()?;
                Some(
                    SdkMeterProvider::builder()
                        .with_periodic_exporter(exporter)
                        .with_resource(resource.clone())
                        .build(),
                )
            } else {
                None
            };
            let logs = if want_logs {
                let exporter = opentelemetry_otlp::LogExporter::builder()
                    .with_http()
                    .with_http_client(UreqClient::new())
                    .with_timeout(timeout())
                    .build()?;
                Some(
                    SdkLoggerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            } else {
                None
            };
            Ok(Self {
                traces,
                metrics,
                logs,
            })
        }

        pub(super) fn exporting(&self) -> Vec<&'static str> {
            let mut on = Vec::new();
            if self.traces.is_some() {
                on.push("traces");
            }
            if self.metrics.is_some() {
                on.push("metrics");
            }
            if self.logs.is_some() {
                on.push("logs");
            }
            on
        }

        pub(super) fn tracing_layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S>>
        where
            S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
        {
            self.traces
                .as_ref()
                .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("driftline")))
        }

        pub(super) fn logs_layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S>>
        where
            S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
        {
            self.logs
                .as_ref()
                .map(opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new)
        }

        pub(super) fn meter(&self) -> Option<opentelemetry::metrics::Meter> {
            use opentelemetry::metrics::MeterProvider as _;
            self.metrics.as_ref().map(|p| p.meter("driftline"))
        }

        pub(super) fn shutdown(self) {
            if let Some(p) = self.traces {
                if let Err(e) = p.shutdown() {
                    tracing::warn!(error = %e, "exporting the last spans failed");
                }
            }
            if let Some(p) = self.metrics {
                if let Err(e) = p.shutdown() {
                    tracing::warn!(error = %e, "exporting the last metrics failed");
                }
            }
            // Last: the warnings above are log records too (this one
            // reaches stderr only).
            if let Some(p) = self.logs {
                if let Err(e) = p.shutdown() {
                    tracing::warn!(error = %e, "exporting the last log records failed");
                }
            }
        }
    }

    /// OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds), default 10 s.
    fn timeout() -> Duration {
        var("OTEL_EXPORTER_OTLP_TIMEOUT")
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10))
    }

    /// OTLP requests through ureq (already our HTTP client for webhooks;
    /// rustls with ring for `https://` endpoints). The SDK exports from its
    /// own threads with a blocking executor, so a blocking client fits.
    #[derive(Debug)]
    struct UreqClient(ureq::Agent);

    impl UreqClient {
        fn new() -> Self {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Self(
                ureq::Agent::config_builder()
                    .timeout_global(Some(timeout()))
                    .http_status_as_error(false)
                    .build()
                    .into(),
            )
        }
    }

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for UreqClient {
        async fn send_bytes(
            &self,
            request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
        ) -> Result<
            opentelemetry_http::Response<opentelemetry_http::Bytes>,
            opentelemetry_http::HttpError,
        > {
            let (parts, body) = request.into_parts();
            let request = ureq::http::Request::from_parts(parts, body.to_vec());
            let response = self.0.run(request)?;
            let (parts, mut body) = response.into_parts();
            let bytes = body.read_to_vec()?;
            Ok(opentelemetry_http::Response::from_parts(
                parts,
                opentelemetry_http::Bytes::from(bytes),
            ))
        }
    }
}
