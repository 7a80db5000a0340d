//! The list of served services: the one place a team edits to serve its
//! own. A service is a proto under `proto/`, a module implementing it, and
//! one line here. Its REST routes, OpenAPI paths, metric series, health
//! status, reflection entry and auth all follow from that line; see
//! `docs/ADDING_A_SERVICE.md`.

use crate::registry::{ServiceContext, ServiceRegistry, SetupError};

/// Registers every application service. Health and reflection are added by
/// the gRPC server itself.
pub fn register(services: &mut ServiceRegistry, ctx: &ServiceContext<'_>) -> Result<(), SetupError> {
    crate::users::register(services, ctx)?;
    Ok(())
}
