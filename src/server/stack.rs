//! The cross-cutting layers around the pipeline, outermost first. The
//! business steps (route, authenticate, validate, cache, token, upstream)
//! stay in [`Pipeline`]'s one function; only concerns that apply to every
//! request whatever it is live here.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::error::error_response;
use crate::pipeline::Pipeline;
use crate::trace_id::TraceId;

/// The public listener's service.
pub(crate) fn stack(
    pipeline: Arc<Pipeline>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error = crate::error::BoxError> + Send + 'static>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        // First, so that nothing below can log the caller's JWT by accident:
        // `Authorization` is marked sensitive before any layer sees it.
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        // Last resort only: the pipeline turns its own panics into a
        // normalized 500 with the request's trace id and a record. This
        // catches a panic outside it, so the connection still gets an
        // answer rather than a reset.
        .layer(CatchPanicLayer::custom(last_resort))
        .service_fn(move |request| {
            let pipeline = pipeline.clone();
            async move { Ok::<_, Infallible>(pipeline.handle(request).await) }
        })
}

fn last_resort(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response<Full<Bytes>> {
    let trace_id = TraceId::generate();
    tracing::error!(trace_id = %trace_id.as_str(), "panic outside the request pipeline");
    let mut response = error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the gateway failed to process the request",
        &trace_id,
    );
    response
        .headers_mut()
        .insert(crate::trace_id::X_TRACEID, trace_id.header_value());
    response
}
