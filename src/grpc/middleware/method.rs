//! Which method a call is for, resolved once per call from its path by the
//! server's call layer ([`super::server`]): its labels, its pre-resolved
//! metric series and whether auth and load shedding apply to it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::metrics::{GrpcFamilies, MethodMetrics};
use crate::registry::Service;
use crate::telemetry::access::MethodText;

/// go-grpc-middleware's `grpc_type` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcType {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl GrpcType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::ClientStream => "client_stream",
            Self::ServerStream => "server_stream",
            Self::BidiStream => "bidi_stream",
        }
    }

    /// The kind of a method, from its descriptor.
    pub fn of(method: &prost_reflect::MethodDescriptor) -> Self {
        match (method.is_client_streaming(), method.is_server_streaming()) {
            (false, false) => Self::Unary,
            (true, false) => Self::ClientStream,
            (false, true) => Self::ServerStream,
            (true, true) => Self::BidiStream,
        }
    }

    /// Whether the client sends exactly one message.
    pub fn single_request(self) -> bool {
        matches!(self, Self::Unary | Self::ServerStream)
    }

    /// Whether the server answers with exactly one message.
    pub fn single_response(self) -> bool {
        matches!(self, Self::Unary | Self::ClientStream)
    }
}

/// Everything the layers need to know about one method.
#[derive(Debug)]
pub struct MethodInfo {
    /// `/package.Service/Method`.
    pub path: String,
    /// Unary or streaming: the metric label and how messages are counted.
    pub grpc_type: GrpcType,
    /// `None` for paths no registered service serves: they are not
    /// counted, which keeps label cardinality bounded.
    pub metrics: Option<MethodMetrics>,
    /// Health and reflection need no credentials.
    pub auth_exempt: bool,
    /// Health checks are never shed, so probes work under load.
    pub shed_exempt: bool,
    /// A method of a registered service; false for a path no service has,
    /// which the router answers UNIMPLEMENTED, for every caller alike.
    pub served: bool,
    /// The fixed part of this method's access line, made once here; `None`
    /// where no access line names the method (paths no service has, and
    /// the methods downstream clients call).
    pub access_text: Option<MethodText>,
}

/// FNV-1a: the method table hashes every call's path, and SipHash over a
/// 30-byte path cost more than the rest of the lookup. A keyed hash guards
/// tables that callers can fill; this one is fixed when the server starts,
/// so a path chosen to collide can only slow its own lookup.
#[derive(Clone, Copy, Debug)]
pub struct PathHasher(u64);

impl Default for PathHasher {
    /// FNV-1a's offset basis.
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for PathHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = self.0;
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type PathMap = HashMap<String, Arc<MethodInfo>, std::hash::BuildHasherDefault<PathHasher>>;

/// Every method of every registered service, by path.
#[derive(Debug)]
pub struct MethodTable {
    by_path: PathMap,
    unknown: Arc<MethodInfo>,
}

impl MethodTable {
    /// Every method of `services`, with its policy and its metric series
    /// (resolved now, so they exist at zero before the first call).
    pub fn build<'a>(services: impl IntoIterator<Item = &'a Service>, families: &GrpcFamilies) -> Self {
        let mut by_path = PathMap::default();
        for service in services {
            for method in service.descriptor.methods() {
                let grpc_type = GrpcType::of(&method);
                let path = format!("/{}/{}", service.name, method.name());
                let info = MethodInfo {
                    metrics: Some(families.method(grpc_type.as_str(), &service.name, method.name())),
                    path: path.clone(),
                    grpc_type,
                    auth_exempt: service.policy.auth_exempt,
                    // Only unary calls are exempt: a stream holds its slot
                    // for as long as the client likes, so exempt streams
                    // (health Watch) would be an unbounded way in.
                    shed_exempt: service.policy.shed_exempt && grpc_type == GrpcType::Unary,
                    served: true,
                    access_text: Some(MethodText::new(&path)),
                };
                by_path.insert(path, Arc::new(info));
            }
        }
        Self { by_path, ..Self::empty() }
    }

    /// A table of the given methods, by their paths (benchmarks and tests
    /// that need no registry).
    pub fn of(methods: impl IntoIterator<Item = MethodInfo>) -> Self {
        let by_path = methods.into_iter().map(|info| (info.path.clone(), Arc::new(info))).collect();
        Self { by_path, ..Self::empty() }
    }

    /// A table that knows no method: nothing through it is measured.
    pub fn empty() -> Self {
        Self {
            by_path: PathMap::default(),
            unknown: Arc::new(MethodInfo {
                path: String::new(),
                grpc_type: GrpcType::Unary,
                metrics: None,
                auth_exempt: false,
                shed_exempt: false,
                served: false,
                access_text: None,
            }),
        }
    }

    /// The method of `path`, borrowed: the server's table lives for the
    /// whole process (see `GrpcServer::bind`), so a call holds a plain
    /// reference and touches no shared reference count.
    pub fn get(&self, path: &str) -> &MethodInfo {
        self.by_path.get(path).unwrap_or(&self.unknown)
    }

    pub fn resolve(&self, path: &str) -> Arc<MethodInfo> {
        self.by_path.get(path).unwrap_or(&self.unknown).clone()
    }
}

/// Resolves a client call's method from its path: a fixed table (the
/// gateway's) or one that grows (a downstream client's, see
/// [`crate::clients`]).
pub trait MethodLookup: std::fmt::Debug + Send + Sync + 'static {
    fn lookup(&self, path: &str) -> Arc<MethodInfo>;
}

impl MethodLookup for MethodTable {
    fn lookup(&self, path: &str) -> Arc<MethodInfo> {
        self.resolve(path)
    }
}
