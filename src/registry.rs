//! The service registry: the one list of served gRPC services, over one
//! [`DescriptorPool`] decoded once at startup. Everything that depends on
//! "which services are there" is derived from it: the gRPC routes, the
//! method table and its pre-initialised metric series, the gateway's routes
//! and OpenAPI document, the health names, the reflection listing and each
//! service's auth and load-shedding policy.
//!
//! Application services are registered in [`crate::services`]; the gRPC
//! server adds the infrastructure services (health, reflection) itself.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use prost_reflect::{DescriptorPool, ServiceDescriptor};
use tonic::server::NamedService;

use crate::config::Settings;
use crate::grpc::routes::ServiceRoutes;
use crate::grpc::stream::StreamSpawner;
use crate::health::ReadinessCheck;

/// A service's own failure to set itself up (a store that cannot open, a
/// client that cannot be configured), reported with its cause chain.
pub type SetupError = Box<dyn std::error::Error + Send + Sync>;

/// What a service module gets to build itself from.
pub struct ServiceContext<'a> {
    /// Every setting, for services that read their own section.
    pub settings: &'a Settings,
    /// Runs server streams: bounded, and ended by the client, the deadline
    /// or shutdown. Clone it into handlers.
    pub streams: StreamSpawner,
    /// The PostgreSQL pool when `database.url` is set. The app owns it:
    /// its readiness check is `database`, and it is closed after the
    /// servers have drained.
    pub database: Option<&'a crate::database::Database>,
    /// The configured downstream clients: `clients.get::<C>("name")` gives
    /// a typed client over the target's one channel. The app owns them:
    /// required ones are readiness checks `clients.<name>`, and all are
    /// closed after the servers have drained.
    pub clients: &'a crate::clients::Clients,
}

/// Why the registry cannot be completed. Each is a defect in the code or
/// the protos, found at startup rather than on the first call.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot decode a descriptor set")]
    Descriptors(#[source] prost_reflect::DescriptorError),
    #[error(
        "service {0} is registered but its descriptors are not in the pool: put its .proto under proto/ \
         or pass its encoded descriptor set to ServiceRegistry::add_descriptors"
    )]
    NoDescriptor(String),
    #[error("service {0} is registered twice")]
    Duplicate(String),
}

/// What can be served: a tower service over gRPC requests and responses
/// with its proto name, as tonic generates them (`FooServiceServer`) or
/// written by hand. Its response body is tonic's, as generated servers'
/// is, so routing a call re-wraps nothing.
pub trait GrpcService:
    tower::Service<
        http::Request<tonic::body::Body>,
        Error = Infallible,
        Response = http::Response<tonic::body::Body>,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Error = Infallible,
            Response = http::Response<tonic::body::Body>,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// How a registered service is treated by the layer stack and the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePolicy {
    /// Calls need no credentials (health checks and reflection).
    pub auth_exempt: bool,
    /// Unary calls are never shed under load, so probes keep answering.
    /// Streams always count against `grpc.max_concurrent_requests`.
    pub shed_exempt: bool,
    /// The gateway derives REST routes and OpenAPI paths for it.
    pub rest: bool,
    /// It reports its own `grpc.health.v1` status, flipped with the rest.
    pub health: bool,
}

/// A registered service with the readiness checks its health follows.
pub type Dependencies = Vec<(String, Vec<String>)>;

impl ServicePolicy {
    /// An application service: authenticated, sheddable, on REST, in health.
    pub const APPLICATION: Self = Self { auth_exempt: false, shed_exempt: false, rest: true, health: true };
    /// Framework services: open, not on REST, not a health name.
    pub const INFRASTRUCTURE: Self = Self { auth_exempt: true, shed_exempt: false, rest: false, health: false };
}

/// One served service: its name, its descriptor and its policy.
#[derive(Clone, Debug)]
pub struct RegisteredService {
    /// The fully qualified proto name, e.g. `package.v1.Service`.
    pub name: String,
    /// Its methods, with their options (the `google.api.http` rules) and
    /// message types; `None` until [`ServiceRegistry::finish`] checks it.
    pub descriptor: Option<ServiceDescriptor>,
    /// How the layers and the gateway treat it.
    pub policy: ServicePolicy,
}

/// Collects the served services. Registration never fails on the spot, so
/// registering a service is one line; [`ServiceRegistry::finish`] reports
/// every problem at once.
pub struct ServiceRegistry {
    /// Every descriptor keel knows: `proto/` as compiled by build.rs, the
    /// health and reflection protos, and any set added by
    /// [`ServiceRegistry::add_descriptors`].
    pool: DescriptorPool,
    /// The gRPC routes of every registered service.
    routes: ServiceRoutes,
    services: Vec<RegisteredService>,
    /// Dependencies readiness waits on, by name.
    readiness: Vec<(String, Arc<dyn ReadinessCheck>)>,
    /// The checks each service's health follows, parallel to `services`.
    depends_on: Vec<Vec<String>>,
    /// Deferred registration problems.
    errors: Vec<RegistryError>,
}

/// Adjusts the policy of the service just registered.
pub struct ServiceOptions<'a> {
    policy: &'a mut ServicePolicy,
    depends_on: &'a mut Vec<String>,
}

impl ServiceOptions<'_> {
    /// Calls need no credentials.
    pub fn auth_exempt(self) -> Self {
        self.policy.auth_exempt = true;
        self
    }

    /// Calls are never shed under load.
    pub fn shed_exempt(self) -> Self {
        self.policy.shed_exempt = true;
        self
    }

    /// No REST routes or OpenAPI paths: gRPC only.
    pub fn without_rest(self) -> Self {
        self.policy.rest = false;
        self
    }

    /// Its gRPC health (and the server's, `""`) is NOT_SERVING while the
    /// readiness check `check` (registered with
    /// [`ServiceRegistry::require_ready`], or `database` by the app) fails,
    /// so the gRPC probe and `/readyz` agree.
    pub fn depends_on(self, check: impl Into<String>) -> Self {
        self.depends_on.push(check.into());
        self
    }
}

impl ServiceRegistry {
    /// A registry over the descriptors compiled from `proto/` and the
    /// infrastructure protos. Protos that are only called as a client are
    /// in the pool too, but serve nothing until a service is registered.
    pub fn new() -> Result<Self, RegistryError> {
        let mut pool = DescriptorPool::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            pool.decode_file_descriptor_set(set).map_err(RegistryError::Descriptors)?;
        }
        Ok(Self {
            pool,
            routes: ServiceRoutes::default(),
            services: Vec::new(),
            readiness: Vec::new(),
            depends_on: Vec::new(),
            errors: Vec::new(),
        })
    }

    /// Adds the descriptors of services compiled outside `proto/` (for
    /// example a test-only service). Files already in the pool are skipped.
    pub fn add_descriptors(&mut self, encoded_file_descriptor_set: &[u8]) -> &mut Self {
        if let Err(error) = self.pool.decode_file_descriptor_set(encoded_file_descriptor_set) {
            self.errors.push(RegistryError::Descriptors(error));
        }
        self
    }

    /// Serves an application service behind the layer stack, on REST and in
    /// health. The returned options change its policy.
    pub fn add<S: GrpcService>(&mut self, service: S) -> ServiceOptions<'_> {
        self.add_with_policy(service, ServicePolicy::APPLICATION)
    }

    /// Serves a service with an explicit policy (the framework's own).
    pub(crate) fn add_with_policy<S: GrpcService>(&mut self, service: S, policy: ServicePolicy) -> ServiceOptions<'_> {
        self.routes.add(service);
        self.services.push(RegisteredService { name: S::NAME.to_owned(), descriptor: None, policy });
        self.depends_on.push(Vec::new());
        let last = self.services.len() - 1;
        ServiceOptions { policy: &mut self.services[last].policy, depends_on: &mut self.depends_on[last] }
    }

    /// Makes `/readyz` fail while `check` does: the service cannot work
    /// without this dependency (its database, a required downstream).
    pub fn require_ready(&mut self, name: impl Into<String>, check: Arc<dyn ReadinessCheck>) -> &mut Self {
        self.readiness.push((name.into(), check));
        self
    }

    /// The one shared descriptor pool.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The names of the services registered so far that report health.
    pub fn health_names(&self) -> Vec<String> {
        self.services.iter().filter(|s| s.policy.health).map(|s| s.name.clone()).collect()
    }

    /// The names of every service registered so far.
    pub fn names(&self) -> Vec<String> {
        self.services.iter().map(|s| s.name.clone()).collect()
    }

    /// An encoded `FileDescriptorSet` holding exactly the files the named
    /// services need (their own files and every import), custom options
    /// included, for reflection: protos that are only called as a client
    /// stay out of it. Names without descriptors are skipped here and
    /// reported by [`ServiceRegistry::finish`].
    pub fn file_descriptor_set_for(&self, names: &[String]) -> Vec<u8> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut stack: Vec<_> =
            names.iter().filter_map(|name| self.pool.get_service_by_name(name)).map(|s| s.parent_file()).collect();
        while let Some(file) = stack.pop() {
            if !seen.insert(file.name().to_owned()) {
                continue;
            }
            stack.extend(file.dependencies());
            // Field 1 (`file`) of FileDescriptorSet, length-delimited.
            let encoded = file.encode_to_vec();
            prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
            prost::encoding::encode_varint(encoded.len() as u64, &mut out);
            out.extend_from_slice(&encoded);
        }
        out
    }

    /// Checks every registration and resolves its descriptor.
    pub fn finish(mut self) -> Result<Services, RegistryError> {
        if let Some(error) = self.errors.drain(..).next() {
            return Err(error);
        }
        let mut seen = HashSet::new();
        for service in &mut self.services {
            if !seen.insert(service.name.clone()) {
                return Err(RegistryError::Duplicate(service.name.clone()));
            }
            let descriptor = self
                .pool
                .get_service_by_name(&service.name)
                .ok_or_else(|| RegistryError::NoDescriptor(service.name.clone()))?;
            service.descriptor = Some(descriptor);
        }
        let dependencies: Dependencies = self
            .services
            .iter()
            .zip(&self.depends_on)
            .filter(|(_, checks)| !checks.is_empty())
            .map(|(service, checks)| (service.name.clone(), checks.clone()))
            .collect();
        let services = self
            .services
            .into_iter()
            .filter_map(|s| Some(Service { descriptor: s.descriptor?, name: s.name, policy: s.policy }))
            .collect();
        Ok(Services { pool: self.pool, routes: self.routes, services, readiness: self.readiness, dependencies })
    }
}

/// One checked registration.
#[derive(Clone, Debug)]
pub struct Service {
    /// The fully qualified proto name.
    pub name: String,
    /// Its methods, options and message types.
    pub descriptor: ServiceDescriptor,
    /// How the layers and the gateway treat it.
    pub policy: ServicePolicy,
}

/// The completed registry, read by every component.
pub struct Services {
    /// The one shared descriptor pool.
    pub pool: DescriptorPool,
    /// The gRPC routes of every service, taken by the gRPC server.
    routes: ServiceRoutes,
    services: Vec<Service>,
    readiness: Vec<(String, Arc<dyn ReadinessCheck>)>,
    /// The checks each service's health follows, for those with any.
    pub dependencies: Dependencies,
}

impl Services {
    /// Every served service, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Service> {
        self.services.iter()
    }

    /// The services the gateway routes to.
    pub fn rest(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(|s| s.policy.rest)
    }

    /// Hands the dependency checks to readiness; called once.
    pub(crate) fn take_readiness(&mut self) -> Vec<(String, Arc<dyn ReadinessCheck>)> {
        std::mem::take(&mut self.readiness)
    }

    /// Hands the routes to the gRPC server; called once.
    pub(crate) fn take_routes(&mut self) -> ServiceRoutes {
        std::mem::take(&mut self.routes)
    }
}
