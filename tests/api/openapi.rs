//! `GET /openapi.json`: an OpenAPI 3 document that covers every /v1 route
//! and whose references all resolve.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::*;

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap_or_default().to_string());
                } else {
                    refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_openapi_document_covers_the_api_and_resolves() {
    let app = spawn_app(GREETING).await;
    let resp = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected = [
        "POST /v1/messages",
        "GET /v1/messages",
        "GET /v1/messages/{id}",
        "DELETE /v1/messages/{id}",
        "POST /v1/messages/{id}/retry",
        "GET /v1/conversations",
        "GET /v1/conversations/{account}/{wa_id}",
        "GET /v1/conversations/{account}/{wa_id}/messages",
        "PUT /v1/conversations/{account}/{wa_id}/state",
        "POST /v1/conversations/{account}/{wa_id}/handoff",
        "DELETE /v1/conversations/{account}/{wa_id}/handoff",
        "POST /v1/conversations/{account}/{wa_id}/opt-out",
        "DELETE /v1/conversations/{account}/{wa_id}/opt-out",
        "GET /v1/queues",
        "GET /v1/stream",
    ];
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(operations, expected);
    // Every documented route exists: without a key it answers 401, not 404.
    for op in &operations {
        let (method, path) = op.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "msg_x")
            .replace("{account}", "main")
            .replace("{wa_id}", ANA);
        let resp = app
            .http
            .request(method.parse().unwrap(), app.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{op}");
    }
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "unresolved {r}"
        );
    }
    let message_in = &doc["components"]["schemas"]["MessageIn"]["properties"];
    assert!(
        message_in["type"].is_object() && message_in["kind"].is_null(),
        "the wire name is `type`"
    );
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
}
