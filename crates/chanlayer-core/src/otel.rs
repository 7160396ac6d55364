//! W3C trace context in message headers (cargo feature `otel`).
//!
//! A send writes the OpenTelemetry context of its operation span as `traceparent` (and
//! `tracestate` when it has one) into each message's headers, unless the message carries a
//! `traceparent` already (the caller's wins) or the backend carries no headers
//! ([`Capabilities::headers`](crate::Capabilities::headers)). A receive that finds a
//! `traceparent` makes its operation span a child of that remote span. See
//! docs/operations.md, "Tracing".
//!
//! Without an OpenTelemetry layer in the `tracing` subscriber, the span's context is not
//! valid and nothing is formatted or written: the cost is a header lookup and a
//! subscriber downcast per message.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::delivery::Delivery;
use crate::message::{Headers, Message};

/// The W3C header naming the sender's trace and span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Writes the current span's trace context into `headers`, unless they carry a
/// `traceparent` already or the span has no valid OpenTelemetry context.
pub(crate) fn inject(headers: &mut Headers) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut Writer(headers));
}

/// Makes `span` a child of the sender's span named by the first `traceparent` in
/// `received`, and links it to every other sender span there (a batch from several
/// senders). Nothing happens where no message carries a valid `traceparent`, the span is
/// disabled, or no OpenTelemetry layer is installed.
///
/// The receive operations do this for their own span. Call it for a span of yours in
/// which you handle a message, so your work is in the sender's trace too. Call it before
/// the span is first entered: OpenTelemetry fixes a span's parent then.
///
/// ```
/// # fn handle(m: &chanlayer_core::Message) {}
/// # async fn run(layer: &dyn chanlayer_core::ChannelLayer, channel: &str) -> chanlayer_core::Result<()> {
/// let m = layer.receive(channel).await?;
/// let span = tracing::info_span!("handle", message_type = m.message_type());
/// chanlayer_core::otel::adopt(&span, &m);
/// span.in_scope(|| handle(&m));
/// # Ok(()) }
/// ```
pub fn adopt<R: Received + ?Sized>(span: &tracing::Span, received: &R) {
    if span.is_disabled() {
        return;
    }
    let propagator = TraceContextPropagator::new();
    let mut parent: Option<SpanContext> = None;
    let mut linked: Vec<SpanContext> = Vec::new();
    received.each_headers(&mut |headers| {
        if !headers.contains_key(TRACEPARENT) {
            return;
        }
        let cx = propagator.extract(&Reader(headers));
        let remote = cx.span().span_context().clone();
        if !remote.is_valid() {
            return;
        }
        match &parent {
            None => parent = Some(remote),
            Some(p) if same_span(p, &remote) => {}
            Some(_) if linked.iter().any(|l| same_span(l, &remote)) => {}
            Some(_) => linked.push(remote),
        }
    });
    let Some(parent) = parent else {
        return;
    };
    // The span's parent is fixed when OpenTelemetry starts it (on first entry): the
    // receive paths enter it only after this. An error means no OpenTelemetry layer.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    for l in linked {
        span.add_link(l);
    }
}

fn same_span(a: &SpanContext, b: &SpanContext) -> bool {
    a.trace_id() == b.trace_id() && a.span_id() == b.span_id()
}

/// What a receive operation returns ([`Message`], [`Delivery`], a batch of deliveries or
/// messages): the headers of each message in it.
pub trait Received {
    /// Calls `f` with the headers of each message, in order.
    fn each_headers(&self, f: &mut dyn FnMut(&Headers));
}

impl Received for Message {
    fn each_headers(&self, f: &mut dyn FnMut(&Headers)) {
        f(self.headers())
    }
}

impl Received for Delivery {
    fn each_headers(&self, f: &mut dyn FnMut(&Headers)) {
        f(self.message().headers())
    }
}

impl<T: Received> Received for [T] {
    fn each_headers(&self, f: &mut dyn FnMut(&Headers)) {
        for item in self {
            item.each_headers(f);
        }
    }
}

impl<T: Received> Received for Vec<T> {
    fn each_headers(&self, f: &mut dyn FnMut(&Headers)) {
        self.as_slice().each_headers(f)
    }
}

/// Writes the propagator's fields into message headers. An empty `tracestate` is not
/// written, and takes away one the message had (it belonged to another `traceparent`).
struct Writer<'a>(&'a mut Headers);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }
}

/// Reads the propagator's fields from message headers.
struct Reader<'a>(&'a Headers);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Runs receive operation `op` in `span`, which becomes a child of the sender's span (the
/// message's `traceparent`): OpenTelemetry fixes a span's parent when the span is first
/// entered, so `span` is entered only once the message is there. It starts when the call
/// does (its time includes the wait); what the wait logs is in the caller's span.
pub(crate) async fn received_in<R: Received>(
    span: tracing::Span,
    op: impl std::future::Future<Output = crate::Result<R>>,
) -> crate::Result<R> {
    let r = op.await;
    if let Ok(got) = &r {
        adopt(&span, got);
    }
    span.in_scope(|| r)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanId, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::layer::ChannelLayer;

    /// The spans ended so far (the SDK's simple processor hands each over as it ends).
    #[derive(Debug, Clone, Default)]
    struct Ended(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Ended {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            crate::toolkit::lock(&self.0).extend(batch);
            Ok(())
        }
    }

    impl Ended {
        /// The ended chanlayer span whose `op` field is `op` (the only one).
        fn op(&self, op: &str) -> SpanData {
            let spans = crate::toolkit::lock(&self.0);
            let mut found = spans.iter().filter(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "op" && kv.value.as_str() == op)
            });
            let one = found.next().cloned();
            assert!(found.next().is_none(), "one {op} span");
            one.unwrap_or_else(|| panic!("a span with op={op} ended: {spans:?}"))
        }
    }

    /// A subscriber with an OpenTelemetry layer whose spans end up in the returned list.
    fn otel_subscriber() -> (impl tracing::Subscriber + Send + Sync, Ended) {
        let ended = Ended::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(ended.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("chanlayer-test")));
        (subscriber, ended)
    }

    fn ids(span: &tracing::Span) -> (String, String) {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }

    #[test]
    fn inject_writes_the_current_span_and_keeps_a_callers_traceparent() {
        let (subscriber, _) = otel_subscriber();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::debug_span!("send");
            let _in = span.enter();
            let (trace, id) = ids(&span);
            let mut h = Headers::new();
            h.insert(TRACESTATE.into(), "stale=1".into());
            inject(&mut h);
            assert_eq!(h.get(TRACEPARENT), Some(&format!("00-{trace}-{id}-01")));
            assert!(
                !h.contains_key(TRACESTATE),
                "an empty tracestate is not written, and takes a stale one away: {h:?}"
            );

            let theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let mut h = Headers::new();
            h.insert(TRACEPARENT.into(), theirs.into());
            inject(&mut h);
            assert_eq!(h.get(TRACEPARENT).map(String::as_str), Some(theirs));
        });
    }

    #[test]
    fn without_an_otel_layer_nothing_is_written() {
        let mut h = Headers::new();
        inject(&mut h);
        assert!(h.is_empty(), "no subscriber");
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            let span = tracing::debug_span!("send");
            let _in = span.enter();
            inject(&mut h);
        });
        assert!(h.is_empty(), "a subscriber without OpenTelemetry: {h:?}");
    }

    #[test]
    fn adopt_parents_on_the_first_sender_and_links_the_others() {
        let first = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let delivery = |tp: Option<&str>| {
            let mut m = Message::new("t", crate::Codec::Json, b"1".to_vec());
            if let Some(tp) = tp {
                m = m.with_header(TRACEPARENT, tp);
            }
            let info = crate::DeliveryInfo {
                id: crate::MessageId(1),
                channel: "c".into(),
                redelivered: false,
                sent_at_ms: 0,
            };
            Delivery::new(m, info, crate::AckHandle::settled())
        };
        let (subscriber, ended) = otel_subscriber();
        tracing::subscriber::with_default(subscriber, || {
            let batch: Vec<Delivery> = [None, Some("garbage"), Some(first), Some(other)]
                .into_iter()
                .chain([Some(first), Some(other)])
                .map(delivery)
                .collect();
            let span = tracing::debug_span!("chanlayer", op = "receive_batch");
            adopt(&span, &batch);
            span.in_scope(|| ());
        });
        let s = ended.op("receive_batch");
        assert_eq!(
            s.span_context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(
            s.parent_span_id,
            SpanId::from_hex("b7ad6b7169203331")
                .ok()
                .unwrap_or(SpanId::INVALID)
        );
        assert!(s.parent_span_is_remote);
        let links: Vec<String> = s
            .links
            .iter()
            .map(|l| l.span_context.span_id().to_string())
            .collect();
        assert_eq!(
            links,
            ["00f067aa0ba902b7"],
            "one link per other sender span"
        );
    }

    /// Through the layer: a send inside a user's span carries the send span's context, and
    /// the receive span is its child.
    #[test]
    fn a_receive_span_is_a_child_of_the_send_span() {
        let (subscriber, ended) = otel_subscriber();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (user_span, received) = tracing::subscriber::with_default(subscriber, || {
            rt.block_on(async {
                let layer = crate::MemoryLayer::connect(
                    &crate::LayerConfig::from_url("memory://otel-unit").expect("url"),
                )
                .await
                .expect("connect");
                let ch = layer.new_channel("t").await.expect("new_channel");
                let user = tracing::info_span!("user.request");
                let user_ids = ids(&user);
                let m = Message::new("t", crate::Codec::Json, b"1".to_vec());
                tracing::Instrument::instrument(layer.send(&ch, m), user)
                    .await
                    .expect("send");
                let got = layer.receive(&ch).await.expect("receive");
                layer.close().await.expect("close");
                (user_ids, got)
            })
        });
        let send = ended.op("send");
        let receive = ended.op("receive");
        assert_eq!(send.span_context.trace_id().to_string(), user_span.0);
        assert_eq!(
            send.parent_span_id.to_string(),
            user_span.1,
            "send is in the user's span"
        );
        assert_eq!(
            received.headers().get(TRACEPARENT),
            Some(&format!(
                "00-{}-{}-01",
                send.span_context.trace_id(),
                send.span_context.span_id()
            )),
            "the message names the send span"
        );
        assert_eq!(
            receive.span_context.trace_id(),
            send.span_context.trace_id()
        );
        assert_eq!(receive.parent_span_id, send.span_context.span_id());
        assert!(receive.parent_span_is_remote);
    }
}
