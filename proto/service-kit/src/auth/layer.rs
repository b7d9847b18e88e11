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
                // The path and the reason, never the header's value. A rising count of unknown tokens is a caller
                // with a revoked token or someone guessing: worth an alert.
                tracing::info!(
                    path,
                    reason = refusal.as_str(),
                    "call refused: UNAUTHENTICATED"
                );
                metrics::counter!("grpc_unauthenticated_total", "reason" => refusal.label())
                    .increment(1);
                let status = tonic::Status::unauthenticated("a valid bearer token is required");
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;

    const TOKEN: &str = "layer-token-0123456789";

    /// The status a call to `path` with these headers gets through the layer ("0" when it reached the service).
    async fn status(path: &str, authorization: Option<&str>) -> String {
        let auth = Authenticator::load(Some(TOKEN), None).unwrap();
        let inner = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        });
        let mut request = Request::builder().uri(format!("http://x{path}"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = AuthLayer::new(auth)
            .layer(inner)
            .oneshot(request.body(()).unwrap())
            .await
            .unwrap();
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| "0".into())
    }

    #[tokio::test]
    async fn only_a_listed_bearer_token_passes_and_health_is_open() {
        let unauthenticated = (tonic::Code::Unauthenticated as i32).to_string();
        let api = "/palette.segmenter.v1.Segmenter/Segment";
        assert_eq!(status(api, None).await, unauthenticated);
        assert_eq!(
            status(api, Some(TOKEN)).await,
            unauthenticated,
            "no Bearer scheme"
        );
        assert_eq!(
            status(api, Some("Basic dXNlcjpwYXNz")).await,
            unauthenticated
        );
        assert_eq!(
            status(api, Some("Bearer layer-token-0123456780")).await,
            unauthenticated
        );
        assert_eq!(status(api, Some(&format!("Bearer {TOKEN}"))).await, "0");
        assert_eq!(status(api, Some(&format!("bearer {TOKEN}"))).await, "0");
        assert_eq!(status("/grpc.health.v1.Health/Check", None).await, "0");
        assert_eq!(status("/grpc.health.v1.Health/Watch", None).await, "0");
        // Reflection is not health: it needs the token.
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(status(reflection, None).await, unauthenticated);
        // A prefix trick does not open anything.
        assert_eq!(
            status("/grpc.health.v1.HealthX/Check", None).await,
            unauthenticated
        );
    }
}
