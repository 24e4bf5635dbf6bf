//! What every route of the OpenAPI document shares, written once: the
//! error answers any route can give (a request that does not parse, no or
//! a bad token, a role too low, an object that does not exist) and the
//! rules for names. Each route's `#[utoipa::path]` lists only what is its
//! own (its success, a conflict, a 503); [`Shared`] adds the rest to every
//! operation, so a new route is documented as the others are.
//!
//! The answers match the server's one error form: every one of them is an
//! [`ErrorBody`](vstream_api::ErrorBody) in JSON, whether a handler, the
//! role guard or an extractor ([`super::extract`]) refused the request.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::{Components, ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

/// The rule [`vstream_farm::validate_name`] checks, for vDisks, devices,
/// stores and tokens: 1 to 64 letters, digits, `.`, `_` or `-`, not
/// starting with `.` or `-`.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$";
/// A device is named by its name or by its MAC address; the colon form is
/// the one no name can take (the others read as names).
pub const DEVICE_KEY_PATTERN: &str =
    "^([A-Za-z0-9_][A-Za-z0-9._-]{0,63}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5})$";

/// The request bodies whose `name` field names a new object.
const NAMED_BODIES: [&str; 4] = ["CreateVDisk", "CreateDevice", "StoreDef", "CreateToken"];

/// The error answers, by status: the response's name under
/// `components/responses`, and what it means.
const ANSWERS: [(&str, &str, &str); 7] = [
    (
        "400",
        "BadRequest",
        "the request does not parse, or a value in it is not valid",
    ),
    (
        "401",
        "Unauthorized",
        "no token, or one that is forged, expired or revoked",
    ),
    ("403", "Forbidden", "the token's role may not do this"),
    ("404", "NotFound", "no such object"),
    ("413", "PayloadTooLarge", "the request body is too large"),
    (
        "415",
        "UnsupportedMediaType",
        "the request body is not sent as Content-Type: application/json",
    ),
    (
        "422",
        "UnprocessableEntity",
        "the JSON body is not of the shape this route takes",
    ),
];

pub(super) struct Shared;

impl utoipa::Modify for Shared {
    fn modify(&self, api: &mut OpenApi) {
        let components = api.components.get_or_insert_with(Components::new);
        for (_, name, description) in ANSWERS {
            let json = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", json)
                .build();
            components
                .responses
                .insert(name.to_owned(), RefOr::T(response));
        }
        for schema in NAMED_BODIES {
            if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut(schema) {
                if o.properties.contains_key("name") {
                    o.properties
                        .insert("name".into(), name_schema(NAME_PATTERN).into());
                }
            }
        }
        for (path, item) in api.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                shared(path, op);
            }
        }
    }
}

/// Adds to operation `op` of `path` the name rules of its path and the
/// error answers it can give.
fn shared(path: &str, op: &mut Operation) {
    let devices = path.starts_with("/api/v1/devices/");
    for p in op.parameters.iter_mut().flatten() {
        if p.parameter_in == ParameterIn::Path && p.name == "name" {
            let pattern = if devices {
                DEVICE_KEY_PATTERN
            } else {
                NAME_PATTERN
            };
            p.schema = Some(name_schema(pattern).into());
        }
    }
    let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let body = op.request_body.as_ref();
    let json_body = body.is_some_and(|b| b.content.contains_key("application/json"));
    // The devices' own routes take no token; every other needs one.
    let token = op.security.as_ref().is_none_or(|s| {
        s.iter()
            .any(|r| *r != utoipa::openapi::security::SecurityRequirement::default())
    });
    let answers = ANSWERS.iter().filter(|(status, _, _)| match *status {
        "400" => has_params || body.is_some(),
        "401" | "403" => token,
        // A path names an object; a body may name others (a vDisk, a store).
        "404" => path.contains('{') || body.is_some(),
        "413" => body.is_some(),
        "415" | "422" => json_body,
        _ => false,
    });
    for (status, name, _) in answers {
        op.responses
            .responses
            .entry((*status).to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
    }
}

fn name_schema(pattern: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(64))
        .pattern(Some(pattern))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patterns are the rules the server checks: every name the farm
    /// takes matches, every name it refuses does not.
    #[test]
    fn name_pattern_is_validate_name() {
        let re = regex::Regex::new(NAME_PATTERN).unwrap();
        let device = regex::Regex::new(DEVICE_KEY_PATTERN).unwrap();
        for name in [
            "a",
            "pc1",
            "win10.v2",
            "_x",
            "A-b_c.d",
            "0",
            &"x".repeat(64),
            "-a",
            ".a",
            "",
            "a b",
            "a/b",
            "é",
            &"x".repeat(65),
            "a:b",
            "a\n",
        ] {
            let ok = vstream_farm::validate_name(name).is_ok();
            assert_eq!(re.is_match(name), ok, "{name:?}: the server says {ok}");
            assert_eq!(device.is_match(name), ok, "{name:?} as a device");
        }
        for mac in ["52:54:00:12:34:56", "AA:bb:CC:dd:EE:ff"] {
            assert!(vstream_api::looks_like_mac(mac), "{mac}");
            assert!(device.is_match(mac), "{mac}");
            assert!(!re.is_match(mac), "{mac}");
        }
    }
}
