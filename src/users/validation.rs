//! The domain rules for users, in one place: what a valid user is, which
//! fields are mutable, and how an update mask applies.

use std::time::SystemTime;

use prost_types::{FieldMask, Timestamp};

use crate::proto::user::v1::User;

const MAX_ID_LEN: usize = 128;
const MAX_NAME_LEN: usize = 256;
const MAX_EMAIL_LEN: usize = 320;
const MAX_ROLES: usize = 64;
/// Every string and list field is bounded, so a user stays small whatever
/// the message size limits are: a watcher's buffer of them is bounded in
/// bytes too.
const MAX_ROLE_LEN: usize = 64;

/// One violated rule, naming the request field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldViolation {
    /// The field's path in the request, e.g. `user.email`.
    pub field: String,
    /// What is wrong with it, for the client.
    pub description: String,
}

impl FieldViolation {
    fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// The fields an update may change. Identifiers and server-set timestamps
/// are not among them.
const MUTABLE_PATHS: [&str; 3] = ["display_name", "email", "roles"];
/// Paths that may appear in a mask but never change anything: the
/// identifier is fixed by the request path and the timestamps are output-only.
const IGNORED_PATHS: [&str; 3] = ["user_id", "create_time", "update_time"];

/// Validates a user to be created, generating its id when empty and setting
/// both timestamps.
pub fn new_user(mut user: User, now: SystemTime) -> Result<User, FieldViolation> {
    if user.user_id.is_empty() {
        user.user_id = uuid::Uuid::new_v4().to_string();
    } else {
        check_user_id(&user.user_id, "user.user_id")?;
    }
    check_mutable_fields(&user)?;
    let stamp = timestamp(now);
    user.create_time = Some(stamp);
    user.update_time = Some(stamp);
    Ok(user)
}

/// Checks a user id taken from a request field.
pub fn check_user_id(id: &str, field: &str) -> Result<(), FieldViolation> {
    if id.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(FieldViolation::new(field, format!("must be at most {MAX_ID_LEN} bytes")));
    }
    // URL-unreserved characters only, so ids embed in REST paths unescaped.
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
        return Err(FieldViolation::new(field, "may contain only letters, digits, '-', '.', '_' and '~'"));
    }
    Ok(())
}

/// Applies `patch` to `existing` for the paths in `mask` (all mutable fields
/// when the mask is empty or `*`), then validates the result.
pub fn apply_update(
    existing: &User,
    patch: &User,
    mask: Option<&FieldMask>,
    now: SystemTime,
) -> Result<User, FieldViolation> {
    let paths: Vec<&str> = match mask {
        Some(m) if !m.paths.is_empty() && !m.paths.iter().any(|p| p == "*") => {
            m.paths.iter().map(String::as_str).collect()
        }
        _ => MUTABLE_PATHS.to_vec(),
    };
    let mut updated = existing.clone();
    for path in paths {
        match path {
            "display_name" => updated.display_name.clone_from(&patch.display_name),
            "email" => updated.email.clone_from(&patch.email),
            "roles" => updated.roles.clone_from(&patch.roles),
            p if IGNORED_PATHS.contains(&p) => {}
            unknown => {
                return Err(FieldViolation::new(
                    "update_mask",
                    format!(
                        "unknown or immutable field path {unknown:?}; mutable paths are {}",
                        MUTABLE_PATHS.join(", ")
                    ),
                ));
            }
        }
    }
    check_mutable_fields(&updated)?;
    updated.update_time = Some(timestamp(now));
    Ok(updated)
}

fn check_mutable_fields(user: &User) -> Result<(), FieldViolation> {
    if user.display_name.trim().is_empty() {
        return Err(FieldViolation::new("user.display_name", "must not be empty"));
    }
    if user.display_name.chars().count() > MAX_NAME_LEN {
        return Err(FieldViolation::new("user.display_name", format!("must be at most {MAX_NAME_LEN} characters")));
    }
    match user.email.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@') => {}
        _ => {
            return Err(FieldViolation::new(
                "user.email",
                "must be an address of the form name@domain (an '@' is required)",
            ));
        }
    }
    if user.email.len() > MAX_EMAIL_LEN {
        return Err(FieldViolation::new("user.email", format!("must be at most {MAX_EMAIL_LEN} bytes")));
    }
    if user.roles.len() > MAX_ROLES {
        return Err(FieldViolation::new("user.roles", format!("must have at most {MAX_ROLES} entries")));
    }
    if user.roles.iter().any(|r| r.trim().is_empty()) {
        return Err(FieldViolation::new("user.roles", "entries must not be empty"));
    }
    if user.roles.iter().any(|r| r.len() > MAX_ROLE_LEN) {
        return Err(FieldViolation::new("user.roles", format!("entries must be at most {MAX_ROLE_LEN} bytes")));
    }
    Ok(())
}

fn timestamp(now: SystemTime) -> Timestamp {
    Timestamp::from(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, email: &str) -> User {
        User { display_name: name.into(), email: email.into(), ..Default::default() }
    }

    #[test]
    fn generates_an_id_and_stamps_times() {
        let created = new_user(user("Ada", "ada@example.com"), SystemTime::now()).unwrap_or_default();
        assert!(!created.user_id.is_empty());
        assert!(created.create_time.is_some());
        assert_eq!(created.create_time, created.update_time);
    }

    #[test]
    fn names_the_offending_field() {
        let err = new_user(user("", "a@b"), SystemTime::now()).err().map(|e| e.field);
        assert_eq!(err.as_deref(), Some("user.display_name"));
        let err = new_user(user("Ada", "nope"), SystemTime::now()).err().map(|e| e.field);
        assert_eq!(err.as_deref(), Some("user.email"));
        let mut bad_id = user("Ada", "a@b");
        bad_id.user_id = "a/b".into();
        let err = new_user(bad_id, SystemTime::now()).err().map(|e| e.field);
        assert_eq!(err.as_deref(), Some("user.user_id"));
    }

    #[test]
    fn masks_limit_what_changes() {
        let now = SystemTime::now();
        let existing = new_user(user("Ada", "ada@example.com"), now).unwrap_or_default();
        let patch = User { display_name: "Bob".into(), ..Default::default() };
        let mask = FieldMask { paths: vec!["display_name".into()] };
        let updated = apply_update(&existing, &patch, Some(&mask), now).unwrap_or_default();
        assert_eq!(updated.display_name, "Bob");
        assert_eq!(updated.email, "ada@example.com");

        let unknown = FieldMask { paths: vec!["nickname".into()] };
        let err = apply_update(&existing, &patch, Some(&unknown), now).err().map(|e| e.field);
        assert_eq!(err.as_deref(), Some("update_mask"));

        // An empty mask means every mutable field, so the empty email fails.
        let err = apply_update(&existing, &patch, None, now).err().map(|e| e.field);
        assert_eq!(err.as_deref(), Some("user.email"));
    }
}
