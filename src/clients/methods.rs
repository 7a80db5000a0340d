//! The methods a client calls, resolved from the descriptor pool the first
//! time each is seen (or up front, for the service a client is declared
//! with): their `grpc_client_*` series, labelled with the client's name,
//! and whether their proto marks them safe to retry.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

use crate::grpc::middleware::method::{GrpcType, MethodInfo, MethodLookup, MethodTable};
use crate::metrics::GrpcFamilies;

/// `google.protobuf.MethodOptions.IdempotencyLevel` values that allow a
/// retry: `NO_SIDE_EFFECTS` (1) and `IDEMPOTENT` (2).
const RETRYABLE_LEVELS: [i32; 2] = [1, 2];

/// One method as a client sees it.
#[derive(Clone)]
struct ClientMethod {
    info: Arc<MethodInfo>,
    /// Unary and marked idempotent (or free of side effects) in its proto.
    retryable: bool,
}

/// The methods of one client. Only methods in the pool get series, so
/// label cardinality stays bounded by the protos compiled in.
pub struct ClientMethods {
    pool: DescriptorPool,
    /// Client families labelled with this client's `grpc_client_target`.
    families: GrpcFamilies,
    known: RwLock<HashMap<String, ClientMethod>>,
    /// Answers for paths no proto in the pool declares: not measured.
    unknown: MethodTable,
}

impl std::fmt::Debug for ClientMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.read().map(|k| k.len()).unwrap_or_default();
        f.debug_struct("ClientMethods").field("known", &known).finish_non_exhaustive()
    }
}

impl ClientMethods {
    pub fn new(pool: DescriptorPool, families: GrpcFamilies) -> Self {
        Self { pool, families, known: RwLock::new(HashMap::new()), unknown: MethodTable::empty() }
    }

    /// Resolves every method of `service` now, so its series exist at zero
    /// before the first call. False when the pool has no such service.
    pub fn declare(&self, service: &str) -> bool {
        let Some(descriptor) = self.pool.get_service_by_name(service) else { return false };
        for method in descriptor.methods() {
            let path = format!("/{service}/{}", method.name());
            self.insert(path, &method);
        }
        true
    }

    /// Whether a call to `path` may be retried.
    pub fn retryable(&self, path: &str) -> bool {
        self.method(path).is_some_and(|m| m.retryable)
    }

    fn method(&self, path: &str) -> Option<ClientMethod> {
        if let Some(found) = self.known.read().ok().and_then(|known| known.get(path).cloned()) {
            return Some(found);
        }
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        let descriptor = self.pool.get_service_by_name(service)?.methods().find(|m| m.name() == method)?;
        Some(self.insert(path.to_owned(), &descriptor))
    }

    fn insert(&self, path: String, method: &MethodDescriptor) -> ClientMethod {
        let grpc_type = GrpcType::of(method);
        let service = method.parent_service().full_name().to_owned();
        let info = Arc::new(MethodInfo {
            metrics: Some(self.families.method(grpc_type.as_str(), &service, method.name())),
            path: path.clone(),
            grpc_type,
            auth_exempt: false,
            shed_exempt: false,
            served: true,
            // Client calls write no access line of their own.
            access_text: None,
        });
        let entry = ClientMethod { info, retryable: grpc_type == GrpcType::Unary && is_idempotent(method) };
        if let Ok(mut known) = self.known.write() {
            known.entry(path).or_insert_with(|| entry.clone());
        }
        entry
    }
}

impl MethodLookup for ClientMethods {
    fn lookup(&self, path: &str) -> Arc<MethodInfo> {
        match self.method(path) {
            Some(method) => method.info,
            None => self.unknown.resolve(path),
        }
    }
}

/// `option idempotency_level = IDEMPOTENT` or `NO_SIDE_EFFECTS`.
fn is_idempotent(method: &MethodDescriptor) -> bool {
    let options = method.options();
    let level = options.get_field_by_name("idempotency_level");
    matches!(level.as_deref(), Some(Value::EnumNumber(n)) if RETRYABLE_LEVELS.contains(n))
}
