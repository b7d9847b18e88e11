//! The tower layer: answers UNAUTHENTICATED before the request reaches a service, except for grpc.health.v1, which
//! stays open so probes need no credential.

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tower::{Layer, Service};

use super::Authenticator;

/// Calls under this prefix are never refused: health says nothing but SERVING or not.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    pub fn new(auth: Authenticator) -> Self {
        AuthLayer { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, B, ResBody> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with(OPEN_PREFIX) {
            return Either::Right(self.inner.call(request));
        }
        match self.auth.allows(request.headers()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(refusal) => {
                // The path and the reason, never the header's value.
                tracing::info!(
                    path,
                    reason = refusal.as_str(),
                    "call refused: UNAUTHENTICATED"
                );
                let status = tonic::Status::unauthenticated("a valid bearer token is required");
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}
