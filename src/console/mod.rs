//! `GET /console`: the agent console, one page embedded in the binary
//! (plain HTML, CSS and JavaScript; no build step). The page holds no
//! secret and no data: it asks for an API key, keeps it in the browser
//! tab's session storage, and reads and changes everything through the
//! `/v1` API with it (live updates from `GET /v1/stream`).

use actix_web::HttpResponse;

const PAGE: &str = include_str!("index.html");

/// What the page may load and talk to: itself only.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// `GET /console`.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(PAGE)
}
