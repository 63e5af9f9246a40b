//! A [`Policy`] as a tower layer: the same engine, over any `Service`
//! with cloneable requests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::*;

/// A [`Policy`] as a tower [`Layer`](tower_layer::Layer).
#[derive(Debug, Clone)]
pub struct PolicyLayer {
    pub(crate) policy: Policy,
    pub(crate) idempotency: Idempotency,
}

impl<S> tower_layer::Layer<S> for PolicyLayer {
    type Service = PolicyService<S>;

    fn layer(&self, inner: S) -> PolicyService<S> {
        PolicyService {
            inner,
            policy: self.policy.clone(),
            idempotency: self.idempotency,
        }
    }
}

/// A service whose requests run under a [`Policy`].
#[derive(Debug, Clone)]
pub struct PolicyService<S> {
    pub(crate) inner: S,
    pub(crate) policy: Policy,
    pub(crate) idempotency: Idempotency,
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req> tower_service::Service<Req> for PolicyService<S>
where
    S: tower_service::Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<Result<S::Response, Error>>;

    /// Always ready: the bulkhead refuses instead of making callers wait,
    /// and each attempt waits for the inner service's readiness itself.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let inner = self.inner.clone();
        let policy = self.policy.clone();
        let idempotency = self.idempotency;
        Box::pin(async move {
            policy
                .run(idempotency, move || {
                    let mut service = inner.clone();
                    let request = request.clone();
                    async move {
                        std::future::poll_fn(|cx| service.poll_ready(cx))
                            .await
                            .map_err(Into::into)?;
                        service.call(request).await.map_err(Into::into)
                    }
                })
                .await
        })
    }
}
