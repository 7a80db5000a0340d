//! The routes of every registered service: a call goes to the service
//! named by its path (`/package.Service/Method`), which picks the method
//! itself, as tonic's generated servers do. A path no service serves is
//! answered UNIMPLEMENTED, naming the service as grpc-go does.
//!
//! Written here instead of using `tonic::service::Routes`, which is an
//! axum router: per call it matched the path against a `/{service}/{*rest}`
//! pattern, stored the matched parameter in the request's extensions (an
//! allocation nobody read), cloned a boxed service, and boxed the request
//! and the response body once more each on the way through axum's body
//! type. That hop cost about 2,900 instructions a GetUser call, more than
//! the access log. Here a call costs a scan of the service names (a
//! length and a `/` rule out all but the right one, whose bytes are then
//! compared once), one reference-count increment and one boxed future.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::registry::GrpcService;

/// The response of a routed call.
pub type RouteFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// One registered service, callable through a shared reference: each call
/// gets its own clone of the service (for a generated server, one
/// reference-count increment) and waits for it to be ready, as `oneshot`
/// does, so the routes themselves are never cloned per call or per
/// connection.
trait Route: Send + Sync + 'static {
    fn call(&self, request: Request<Body>) -> RouteFuture;
}

struct Served<S>(S);

impl<S: GrpcService> Route for Served<S> {
    fn call(&self, request: Request<Body>) -> RouteFuture {
        let service = self.0.clone();
        // The service is called when the future is first polled, not now:
        // the call layer polls it inside the call's scope, so a service
        // that reads the caller's deadline or request id in `call` itself
        // (rather than in its future) finds them, and a panic there is
        // caught with the handler's.
        Box::pin(async move {
            let Ok(response) = service.oneshot(request).await;
            Ok(response)
        })
    }
}

/// A service's proto name and its route.
type Named = (Box<str>, Arc<dyn Route>);

/// Every registered service with its proto name, in registration order.
/// Cheap to clone: clones share one list, built once before the server
/// starts.
#[derive(Clone, Default)]
pub struct ServiceRoutes {
    by_name: Arc<Vec<Named>>,
}

impl std::fmt::Debug for ServiceRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.iter().map(|(name, _)| name)).finish()
    }
}

impl ServiceRoutes {
    /// Adds `service` under its `NamedService::NAME`. The registry refuses
    /// a name registered twice before the routes are used.
    pub(crate) fn add<S: GrpcService>(&mut self, service: S) {
        Arc::make_mut(&mut self.by_name).push((S::NAME.into(), Arc::new(Served(service))));
    }

    /// The service a path names: `/package.Service/Method`, with a
    /// non-empty method part.
    fn route(&self, path: &str) -> Result<&dyn Route, Status> {
        let rest = path.strip_prefix('/').unwrap_or_default();
        let named = self.by_name.iter().find(|(name, _)| {
            let (rest, name) = (rest.as_bytes(), name.as_bytes());
            // `/`, then more than the name: the method part is not empty.
            rest.len() > name.len() + 1 && rest[name.len()] == b'/' && rest.starts_with(name)
        });
        if let Some((_, route)) = named {
            return Ok(route.as_ref());
        }
        match path.starts_with('/').then(|| rest.split_once('/')).flatten() {
            Some((service, method)) if !method.is_empty() && !service.is_empty() => {
                Err(Status::unimplemented(format!("unknown service {service}")))
            }
            _ => Err(Status::unimplemented(format!("malformed method name: {path:?}"))),
        }
    }
}

impl Service<Request<Body>> for ServiceRoutes {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> RouteFuture {
        match self.route(request.uri().path()) {
            Ok(route) => route.call(request),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// Hands the call layer's service to tonic's server in place of the
/// routes tonic insists on: `Server::add_routes` takes only its own axum
/// routes, so the server is given empty ones, and this layer, the one
/// tonic wraps them in, puts [`ServiceRoutes`] behind the call layer
/// instead. Tonic's router is never called.
#[derive(Clone)]
pub struct InsteadOfTonicRoutes<L> {
    /// The call layer, which every call passes before its route.
    pub layer: L,
    /// What the call layer wraps instead of tonic's (empty) routes.
    pub routes: ServiceRoutes,
}

impl<L: tower::Layer<ServiceRoutes>> tower::Layer<tonic::service::Routes> for InsteadOfTonicRoutes<L> {
    type Service = L::Service;

    fn layer(&self, _unused: tonic::service::Routes) -> Self::Service {
        self.layer.layer(self.routes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Svc;

    impl tonic::server::NamedService for Svc {
        const NAME: &'static str = "pkg.Svc";
    }

    impl Service<Request<Body>> for Svc {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Ok(Response::new(Body::empty())))
        }
    }

    fn assert_unimplemented(routes: &ServiceRoutes, cases: &[(&str, &str)]) {
        for &(path, message) in cases {
            let Err(status) = routes.route(path) else { panic!("{path} was routed") };
            assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}");
            assert_eq!(status.message(), message, "{path}");
        }
    }

    #[test]
    fn a_path_reaches_the_service_it_names_and_no_other() {
        let mut routes = ServiceRoutes::default();
        routes.add(Svc);
        assert!(routes.route("/pkg.Svc/Method").is_ok());
        assert!(routes.route("/pkg.Svc/M").is_ok());
        assert_unimplemented(
            &routes,
            &[
                ("/pkg.SvcX/Method", "unknown service pkg.SvcX"),
                ("/pkg.Sv/cMethod", "unknown service pkg.Sv"),
                ("/pkg.Svc/", "malformed method name: \"/pkg.Svc/\""),
                ("pkg.Svc/Method", "malformed method name: \"pkg.Svc/Method\""),
                ("//Method", "malformed method name: \"//Method\""),
            ],
        );
        // With no service at all, every path is refused the same way.
        assert_unimplemented(
            &ServiceRoutes::default(),
            &[("/pkg.Svc/Method", "unknown service pkg.Svc"), ("/", "malformed method name: \"/\"")],
        );
    }
}
