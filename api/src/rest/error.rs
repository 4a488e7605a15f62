//! API errors: every failure is a JSON [`ErrorBody`] `{code, message}` with a status code chosen
//! by one table ([`ApiError::from`] for daemon errors). See `docs/api.md` for the policy.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use vgpu_device::phys::PhysError;
use vgpu_device::sched::{ParamsError, SchedError};

use crate::daemon::DaemonError;
use crate::model::ErrorBody;

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Explanation.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request itself is malformed (JSON syntax, query string, path).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422: well-formed JSON that does not fit the request schema or its value ranges.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.into(),
            message: self.message.clone(),
        }
    }
}

/// `error` and its sources, joined with ": ".
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        use DaemonError as D;
        let msg = chain(&e);
        let (status, code) = match &e {
            D::UnknownVgpu(_) | D::UnknownName(_) => (StatusCode::NOT_FOUND, "vgpu_not_found"),
            D::UnknownProfile(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_profile"),
            D::BadSpec { .. } | D::BadName { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value")
            }
            D::NoEngine { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "no_such_engine"),
            D::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
            D::Attached(_) => (StatusCode::CONFLICT, "vgpu_attached"),
            D::Display(_) => (StatusCode::CONFLICT, "display_unavailable"),
            D::Phys(PhysError::Exhausted { .. }) => {
                (StatusCode::INSUFFICIENT_STORAGE, "capacity_exhausted")
            }
            D::Sched(SchedError::Params(ParamsError::OverReserved { .. })) => {
                (StatusCode::CONFLICT, "over_reserved")
            }
            D::Sched(SchedError::Params(_) | SchedError::Slice(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value")
            }
            D::Sched(SchedError::UnknownVgpu(_)) => (StatusCode::NOT_FOUND, "vgpu_not_found"),
            D::Sched(_) | D::Phys(_) | D::Vgpu(_) | D::Serve { .. } | D::SocketDir(..) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %msg, "request failed");
        }
        ApiError::new(status, code, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut r = (self.status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_device::phys::Resource;

    #[test]
    fn test_daemon_errors_map_to_documented_statuses() {
        let cases: Vec<(DaemonError, u16, &str)> = vec![
            (DaemonError::UnknownVgpu(3), 404, "vgpu_not_found"),
            (DaemonError::UnknownName("x".into()), 404, "vgpu_not_found"),
            (
                DaemonError::UnknownProfile("huge".into()),
                422,
                "unknown_profile",
            ),
            (DaemonError::NameTaken("a".into()), 409, "name_taken"),
            (DaemonError::Attached(1), 409, "vgpu_attached"),
            (
                DaemonError::Phys(PhysError::Exhausted {
                    resource: Resource::LocalMemory,
                    profile: "large",
                }),
                507,
                "capacity_exhausted",
            ),
            (
                DaemonError::Sched(SchedError::Params(ParamsError::Weight(0))),
                422,
                "invalid_value",
            ),
            (
                DaemonError::Sched(SchedError::Params(ParamsError::OverReserved {
                    engine: "blit",
                    total: 120,
                })),
                409,
                "over_reserved",
            ),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code), (status, code), "{}", a.message);
        }
    }

    #[test]
    fn test_error_message_includes_cause_chain() {
        let a = ApiError::from(DaemonError::Phys(PhysError::Exhausted {
            resource: Resource::LocalMemory,
            profile: "large",
        }));
        assert_eq!(
            a.message,
            "Cannot create the vGPU: Out of local memory for profile large"
        );
    }
}
