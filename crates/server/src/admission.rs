//! What happens to a call before any service sees it: the gate (who may call what), the
//! in-flight limit, and the receive budget that bounds the memory held by requests still
//! arriving.
//!
//! tonic reserves a message's announced length as soon as its 5-byte prefix arrives, so a
//! client announcing 4 MB on thousands of streams, and sending nothing more, costs the
//! server gigabytes. Here a request body is held back until a whole message has arrived;
//! the bytes held meanwhile are charged to one budget per server, and a stream that would
//! go past it is refused. tonic then sees only whole messages, whose memory was paid for
//! by bytes actually received.

use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tower_service::Service;

/// What a gate decided about a call it admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallClass {
    /// Work for a caller: counted against the server's in-flight limit.
    Work,
    /// Cluster upkeep (membership): never shed, so heartbeats go on under any load.
    Control,
}

/// Decides, from a call's path and headers alone (before its body is read), whether the
/// call may proceed. What it learns (the caller's key, say) it leaves in `extensions`, where
/// the service finds it.
pub trait Gate: Send + Sync + 'static {
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<CallClass, Status>;
}

/// A gate that admits every call as work: for servers with nothing to protect.
pub struct OpenGate;

impl Gate for OpenGate {
    fn admit(
        &self,
        _path: &str,
        _headers: &http::HeaderMap,
        _extensions: &mut http::Extensions,
    ) -> Result<CallClass, Status> {
        Ok(CallClass::Work)
    }
}

/// Limits on what one server takes in.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Calls counted as work running at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Bytes of requests still arriving, across every stream; past it, RESOURCE_EXHAUSTED.
    pub receive_budget_bytes: usize,
    /// The largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Streams one HTTP/2 connection may open at once.
    pub max_concurrent_streams: u32,
    /// Bytes of request headers accepted per call.
    pub max_header_list_bytes: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_in_flight: 4096,
            receive_budget_bytes: 256 * 1024 * 1024,
            max_message_bytes: switchyard_core::session::MAX_GRPC_MESSAGE_BYTES,
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 * 1024,
        }
    }
}

/// Paths open to anyone: health (Kubernetes probes) and reflection (grpcurl).
fn is_open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

struct Shared {
    gate: Arc<dyn Gate>,
    in_flight: Arc<Semaphore>,
    budget: Arc<ReceiveBudget>,
    limits: ServerLimits,
}

/// The tower layer that puts [`Admission`] in front of a server's routes.
#[derive(Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

impl AdmissionLayer {
    pub fn new(gate: Arc<dyn Gate>, limits: ServerLimits) -> Self {
        AdmissionLayer {
            shared: Arc::new(Shared {
                gate,
                in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
                budget: Arc::new(ReceiveBudget {
                    used: AtomicUsize::new(0),
                    limit: limits.receive_budget_bytes,
                }),
                limits,
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

type ResponseFuture =
    Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let shared = &self.shared;
        let class = if is_open_path(parts.uri.path()) {
            CallClass::Control
        } else {
            match shared
                .gate
                .admit(parts.uri.path(), &parts.headers, &mut parts.extensions)
            {
                Ok(class) => class,
                // Refused on its headers: the body is never read.
                Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
            }
        };
        let body = WholeMessages {
            inner: body,
            buffer: BytesMut::new(),
            charged: 0,
            budget: shared.budget.clone(),
            max_message_bytes: shared.limits.max_message_bytes,
            finished: false,
        };
        if class == CallClass::Control {
            let request = http::Request::from_parts(parts, Body::new(body));
            return Box::pin(self.inner.call(request));
        }
        // Work is admitted once its request message has arrived whole: until then a call
        // holds only the bytes charged to the budget, so streams that never finish their
        // request cannot take the in-flight places of calls that did.
        let shared = shared.clone();
        let mut inner = self.inner.clone();
        std::mem::swap(&mut self.inner, &mut inner);
        Box::pin(async move {
            let mut body = body;
            let first = match tokio::time::timeout(
                REQUEST_ARRIVAL_TIMEOUT,
                poll_fn(|context| Pin::new(&mut body).poll_frame(context)),
            )
            .await
            {
                Err(_) => {
                    return Ok(Status::deadline_exceeded(format!(
                        "the request did not arrive within {REQUEST_ARRIVAL_TIMEOUT:?}"
                    ))
                    .into_http());
                }
                Ok(Some(Err(status))) => return Ok(status.into_http()),
                Ok(Some(Ok(frame))) => Some(frame),
                Ok(None) => None,
            };
            let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
                let status = Status::resource_exhausted(format!(
                    "server busy: {} calls in flight; retry with backoff",
                    shared.limits.max_in_flight
                ));
                return Ok(status.into_http());
            };
            let body = Body::new(Prepended { first, rest: body });
            let response = inner.call(http::Request::from_parts(parts, body)).await?;
            // The permit is held until the response body (a stream's last event) is done.
            Ok(response.map(|body| Body::new(HoldingPermit { body, permit })))
        })
    }
}

/// How long a call's request message may take to arrive whole.
const REQUEST_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A body whose first frame was read ahead, then the rest.
struct Prepended {
    first: Option<Frame<Bytes>>,
    rest: WholeMessages,
}

impl HttpBody for Prepended {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// Bytes of requests still arriving, on one server.
struct ReceiveBudget {
    used: AtomicUsize,
    limit: usize,
}

impl ReceiveBudget {
    fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// A request body that yields only whole gRPC messages (5-byte prefix and payload).
struct WholeMessages {
    inner: Body,
    buffer: BytesMut,
    /// Bytes of `buffer` charged to the budget.
    charged: usize,
    budget: Arc<ReceiveBudget>,
    max_message_bytes: usize,
    finished: bool,
}

/// The length of the first message in `bytes` with its prefix, once the prefix is there.
fn framed_length(bytes: &[u8]) -> Option<usize> {
    let prefix = bytes.get(..5)?;
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    Some(5 + length as usize)
}

impl WholeMessages {
    fn take_message(&mut self) -> Option<Bytes> {
        let length = framed_length(&self.buffer)?;
        if self.buffer.len() < length {
            return None;
        }
        let message = self.buffer.split_to(length).freeze();
        let released = length.min(self.charged);
        self.charged -= released;
        self.budget.release(released);
        Some(message)
    }

    fn check_announced(&self) -> Result<(), Status> {
        match framed_length(&self.buffer) {
            Some(length) if length - 5 > self.max_message_bytes => {
                Err(Status::resource_exhausted(format!(
                    "request message of {} bytes is over the limit of {} bytes",
                    length - 5,
                    self.max_message_bytes
                )))
            }
            _ => Ok(()),
        }
    }

    fn release_all(&mut self) {
        self.budget.release(self.charged);
        self.charged = 0;
    }
}

impl Drop for WholeMessages {
    fn drop(&mut self) {
        self.release_all();
    }
}

impl HttpBody for WholeMessages {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = this.take_message() {
                return Poll::Ready(Some(Ok(Frame::data(message))));
            }
            if this.finished {
                if this.buffer.is_empty() {
                    return Poll::Ready(None);
                }
                // A truncated message: tonic reports it.
                let rest = this.buffer.split().freeze();
                this.release_all();
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(context)) {
                None => this.finished = true,
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                Some(Ok(frame)) => {
                    let mut data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => {
                            // Trailers end the request: hand over what is buffered first.
                            this.finished = true;
                            if this.buffer.is_empty() {
                                return Poll::Ready(Some(Ok(frame)));
                            }
                            continue;
                        }
                    };
                    // The common case: exactly one whole message in one frame, passed on.
                    if this.buffer.is_empty() && framed_length(&data) == Some(data.len()) {
                        if data.len() - 5 > this.max_message_bytes {
                            this.buffer.extend_from_slice(&data[..5]);
                            let refused = this.check_announced();
                            this.buffer.clear();
                            return Poll::Ready(Some(refused.map(|()| Frame::data(Bytes::new()))));
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let length = data.remaining();
                    if !this.budget.try_charge(length) {
                        return Poll::Ready(Some(Err(Status::resource_exhausted(
                            "server is receiving too much at once; retry with backoff",
                        ))));
                    }
                    this.charged += length;
                    this.buffer.extend_from_slice(&data.copy_to_bytes(length));
                    if let Err(status) = this.check_announced() {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.buffer.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A response body that keeps its call's in-flight permit until it is done.
struct HoldingPermit {
    body: Body,
    #[allow(dead_code)]
    permit: OwnedSemaphorePermit,
}

impl HttpBody for HoldingPermit {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn budget(limit: usize) -> Arc<ReceiveBudget> {
        Arc::new(ReceiveBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// A body of `chunks`; with `then_wait`, the client then sends nothing more.
    fn whole(
        chunks: Vec<Vec<u8>>,
        then_wait: bool,
        budget: &Arc<ReceiveBudget>,
        max: usize,
    ) -> WholeMessages {
        use futures::StreamExt;

        let sent = futures::stream::iter(
            chunks
                .into_iter()
                .map(|chunk| Ok::<_, Status>(Frame::data(Bytes::from(chunk)))),
        );
        let inner = if then_wait {
            Body::new(http_body_util::StreamBody::new(
                sent.chain(futures::stream::pending()),
            ))
        } else {
            Body::new(http_body_util::StreamBody::new(sent))
        };
        WholeMessages {
            inner,
            buffer: BytesMut::new(),
            charged: 0,
            budget: budget.clone(),
            max_message_bytes: max,
            finished: false,
        }
    }

    #[tokio::test]
    async fn messages_split_over_frames_come_out_whole_and_release_the_budget() {
        let first = framed(b"hello");
        let second = framed(&[7; 300]);
        let mut joined = first.clone();
        joined.extend_from_slice(&second);
        let chunks: Vec<Vec<u8>> = joined.chunks(3).map(<[u8]>::to_vec).collect();
        let budget = budget(1024);
        let mut body = whole(chunks, false, &budget, 1024);
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            seen.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(seen, vec![Bytes::from(first), Bytes::from(second)]);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_prefix_announcing_too_much_is_refused_before_anything_is_held() {
        let mut prefix = vec![0];
        prefix.extend_from_slice(&(4_000_000u32).to_be_bytes());
        let budget = budget(1024 * 1024);
        let mut body = whole(vec![prefix], true, &budget, 1024 * 1024);
        let refused = body.frame().await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(body);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn streams_past_the_budget_are_refused_and_dropping_one_frees_its_share() {
        let message = framed(&[1; 100]);
        let budget = budget(100);
        let mut first = whole(vec![message[..60].to_vec()], true, &budget, 1024);
        // Part of a message arrived and waits for the rest: charged, nothing yielded.
        assert!(futures::poll!(std::pin::pin!(first.frame())).is_pending());
        assert_eq!(budget.used.load(Ordering::Acquire), 60);

        let mut second = whole(vec![message[..60].to_vec()], true, &budget, 1024);
        let refused = second.frame().await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

        drop(first);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
        let mut third = whole(vec![message.clone()], false, &budget, 1024);
        let frame = third.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from(message));
    }
}
