//! `GET /openapi.json`: the OpenAPI 3 document of the agent API, generated
//! from the handlers' `#[utoipa::path]` annotations and the wire types.

use actix_web::HttpResponse;
use utoipa::openapi::security::{
    ApiKey as ApiKeyScheme, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
};
use utoipa::{Modify, OpenApi};

use super::dto::*;
use super::{conversations, messages, stream};

#[derive(OpenApi)]
#[openapi(
    info(title = "wa-router agent API", description = "Send and track WhatsApp messages, read and steer conversations. Errors: `{\"error\": {\"code\", \"message\", \"field\"}}`."),
    paths(
        messages::send, messages::list, messages::get, messages::cancel, messages::retry,
        conversations::list, conversations::get, conversations::messages, conversations::put_state,
        conversations::handoff, conversations::release, conversations::opt_out, conversations::opt_in,
        conversations::queues, stream::stream,
    ),
    components(schemas(
        MessageIn, AcceptedOut, RecordOut, RecordErrorOut, HistoryOut, MessageListOut, ConversationOut, ConversationListOut,
        ContactOut, WindowOut, HandoffOut, RecentOut, RecentListOut, StateIn, HandoffIn, QueueOut, QueuesOut, ErrorBody, ErrorEnvelope,
    )),
    modifiers(&Security),
    security(("api_key" = []), ("bearer" = [])),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON.
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `GET /openapi.json`.
pub async fn serve() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}
