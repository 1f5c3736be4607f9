//! The OpenAPI document every service serves at [`OPENAPI_PATH`], derived from its handlers.
//!
//! A service collects its routes with utoipa-axum's `OpenApiRouter` (`routes!(handler, …)`,
//! each handler annotated with `#[utoipa::path(…)]`, its bodies deriving `ToSchema`), so a
//! route cannot exist without its documentation. [`document`] then adds what every service
//! shares, in one place: the title, the routes of [`crate::http::with_common_routes`], the
//! JSON error body as the `default` answer of every operation (every 4xx/5xx is an
//! [`ErrorBody`]), and axum's `{*rest}` written as OpenAPI's `{rest}`.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::PartialSchema;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, RefOr, ResponseBuilder, Schema, Type,
};

use crate::error::{ApiError, ErrorBody};

/// Where every service serves its OpenAPI document.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// The name of the shared error answer under `components.responses`.
const ERROR_RESPONSE: &str = "Error";

/// `doc` (from a service's `OpenApiRouter`) completed with what every service shares.
/// `title` names the service; `description` says what it is for and who calls it.
pub fn document(mut doc: OpenApi, title: &str, description: &str) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title(title)
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(format!(
            "{description}\n\nCalls carry `Authorization: Bearer <token>` where a token is \
             needed; who may call each route, and from which network, is in docs/security.md. \
             Every refusal or failure answers the JSON `ErrorBody`."
        )))
        .build();
    // axum's catch-all `{*rest}` is an ordinary parameter for OpenAPI.
    let paths = std::mem::take(&mut doc.paths.paths);
    doc.paths.paths = paths
        .into_iter()
        .map(|(path, item)| (path.replace("{*", "{"), item))
        .collect();
    for (path, item) in shared_paths() {
        doc.paths.paths.insert(path.to_string(), item);
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert("ErrorBody".to_string(), ErrorBody::schema());
    components.responses.insert(
        ERROR_RESPONSE.to_string(),
        RefOr::T(
            ResponseBuilder::new()
                .description("The request was refused or failed; `error` says why.")
                .content("application/json", json_ref("ErrorBody"))
                .build(),
        ),
    );
    components.security_schemes.insert(
        "bearer".to_string(),
        RefOr::T(SecurityScheme::Http(
            HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build(),
        )),
    );
    for item in doc.paths.paths.values_mut() {
        // One handler may serve several methods (`method(get, head)`): operation ids stay
        // unique with the method appended to every one after the first.
        let mut seen = std::collections::HashSet::new();
        for (method, op) in operations(item) {
            if let Some(id) = op.operation_id.as_mut()
                && !seen.insert(id.clone())
            {
                id.push('_');
                id.push_str(method);
            }
            op.responses
                .responses
                .entry("default".to_string())
                .or_insert_with(|| {
                    RefOr::Ref(utoipa::openapi::Ref::from_response_name(ERROR_RESPONSE))
                });
        }
    }
    doc
}

/// The router serving `doc` as JSON, readable without a token. Merge it after the service's
/// auth layers: a layer only wraps the routes that exist when it is applied.
pub fn router(doc: &OpenApi) -> Router {
    let json: Result<Arc<[u8]>, String> = serde_json::to_vec(doc)
        .map(Arc::from)
        .map_err(|e| e.to_string());
    Router::new().route(
        OPENAPI_PATH,
        get(move || async move {
            match json {
                Ok(bytes) => (
                    [(header::CONTENT_TYPE, "application/json")],
                    axum::body::Bytes::copy_from_slice(&bytes),
                )
                    .into_response(),
                Err(e) => ApiError::internal(format!("OpenAPI document: {e}")).into_response(),
            }
        }),
    )
}

fn json_ref(name: &str) -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(RefOr::<Schema>::Ref(
            utoipa::openapi::Ref::from_schema_name(name),
        )))
        .build()
}

fn operations(
    item: &mut PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("get", item.get.as_mut()),
        ("put", item.put.as_mut()),
        ("post", item.post.as_mut()),
        ("delete", item.delete.as_mut()),
        ("options", item.options.as_mut()),
        ("head", item.head.as_mut()),
        ("patch", item.patch.as_mut()),
        ("trace", item.trace.as_mut()),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.map(|op| (method, op)))
}

/// The routes [`crate::http::with_common_routes`] and [`router`] add to every service.
fn shared_paths() -> [(&'static str, PathItem); 3] {
    let text = |description: &str, content_type: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                content_type,
                ContentBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build(),
            )
            .build()
    };
    let health = ObjectBuilder::new()
        .property("status", ObjectBuilder::new().schema_type(Type::String))
        .property("service", ObjectBuilder::new().schema_type(Type::String))
        .required("status")
        .required("service");
    let get_op = |id: &str, summary: &str, status: &str, response| {
        PathItem::new(
            HttpMethod::Get,
            OperationBuilder::new()
                .operation_id(Some(id))
                .summary(Some(summary))
                .tag("shared")
                .response(status, response)
                .build(),
        )
    };
    [
        (
            "/healthz",
            get_op(
                "healthz",
                "Liveness and readiness (no token); 503 with the reason when unhealthy.",
                "200",
                ResponseBuilder::new()
                    .description("The service and its database answer.")
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(health)).build(),
                    )
                    .build(),
            ),
        ),
        (
            "/metrics",
            get_op(
                "metrics",
                "Prometheus metrics (`dutgate_` namespace, text exposition format, no token).",
                "200",
                text("The metrics.", "text/plain"),
            ),
        ),
        (
            OPENAPI_PATH,
            get_op(
                "openapi",
                "This document (no token).",
                "200",
                ResponseBuilder::new()
                    .description("The OpenAPI 3.1 document.")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                            .build(),
                    )
                    .build(),
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[utoipa::path(method(get, head), path = "/things/{*rest}", responses((status = 200, body = ErrorBody)))]
    #[allow(dead_code)]
    async fn thing() {}

    #[tokio::test]
    async fn document_is_completed_and_served_as_json() {
        let (_, doc) = utoipa_axum::router::OpenApiRouter::<()>::new()
            .routes(utoipa_axum::routes!(thing))
            .split_for_parts();
        let doc = document(doc, "thing service", "Things.");
        let app = router(&doc);
        let res = app
            .oneshot(Request::get(OPENAPI_PATH).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
        assert_eq!(v["info"]["title"], "thing service");
        let op = &v["paths"]["/things/{rest}"]["get"];
        assert!(op.is_object(), "{v:#}");
        assert_eq!(op["operationId"], "thing");
        assert_eq!(
            v["paths"]["/things/{rest}"]["head"]["operationId"],
            "thing_head"
        );
        assert_eq!(
            op["responses"]["default"]["$ref"],
            "#/components/responses/Error"
        );
        for shared in ["/healthz", "/metrics", OPENAPI_PATH] {
            assert!(v["paths"][shared]["get"].is_object(), "{shared} missing");
        }
        assert!(v["components"]["schemas"]["ErrorBody"]["properties"]["error"].is_object());
    }
}
