//! docs/reference/inferencepool.md names every field of the generated schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::CustomResourceExt;
use parallax_crds::InferencePool;
use serde_json::Value;

fn fields(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(properties) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, schema) in properties {
        let field = format!("{path}.{name}");
        out.push(field.clone());
        // Kubernetes' own types (tolerations, conditions) are documented upstream.
        if !matches!(name.as_str(), "tolerations" | "conditions") {
            fields(schema, &field, out);
        }
    }
}

#[test]
fn every_field_is_documented() {
    let crd = serde_json::to_value(InferencePool::crd()).unwrap();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let mut all = Vec::new();
    fields(&root["spec"], "spec", &mut all);
    fields(&root["status"], "status", &mut all);
    let doc_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/inferencepool.md");
    let doc = std::fs::read_to_string(doc_path).unwrap();
    let missing: Vec<_> = all
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/reference/inferencepool.md lacks {missing:?}"
    );
    assert!(all.len() > 50, "walked only {} fields", all.len());
}
