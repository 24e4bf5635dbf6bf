//! The one place an error becomes an HTTP response.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use vstream_api::ErrorBody;
use vstream_farm::FarmError;
use vstream_image::ImageError;

/// An API error: a status and a sentence.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The handler logged it already (a refused login): not logged again.
    pub logged: bool,
    /// Seconds to send as `Retry-After` (a 429 or 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            logged: false,
            retry_after: None,
        }
    }
    /// Tells the client when to ask again.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
    /// Marks an error its handler has logged itself, so that it is one line.
    pub fn logged(mut self) -> ApiError {
        self.logged = true;
        self
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() && !self.logged {
            tracing::error!(status = %self.status, error = %self.message, "API request failed");
        }
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<FarmError> for ApiError {
    fn from(e: FarmError) -> ApiError {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, e.to_string())
    }
}

impl From<crate::enroll::Refused> for ApiError {
    fn from(e: crate::enroll::Refused) -> ApiError {
        use crate::enroll::Refused;
        match e {
            Refused::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, why),
            Refused::BadRequest(why) => ApiError::bad_request(why),
            Refused::Unavailable(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why),
            Refused::Farm(e) => e.into(),
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> ApiError {
        let status = match &e {
            ImageError::NoSuchVDisk(_) => StatusCode::NOT_FOUND,
            ImageError::VDiskExists(_) => StatusCode::CONFLICT,
            ImageError::Invalid(_) => StatusCode::BAD_REQUEST,
            ImageError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // Give the whole chain: "writing /x: No space left on device".
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        ApiError::new(status, msg)
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::internal(format!("a worker task failed: {e}"))
    }
}
