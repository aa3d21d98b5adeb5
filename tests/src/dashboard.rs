//! The Grafana dashboard in `deploy/grafana/`: its panels' PromQL, read out of the JSON,
//! and Grafana's template variables filled in as Grafana would before querying.

use std::path::Path;

use serde_json::Value;

/// The dashboard, from the workspace root.
pub const PATH: &str = "deploy/grafana/egress-monitor.json";

/// One query of a panel.
#[derive(Clone, Debug)]
pub struct Query {
    pub panel: String,
    pub expr: String,
}

/// The dashboard's JSON.
pub fn load() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join(PATH);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{PATH} is not JSON: {e}"))
}

/// Every `targets[].expr` of every panel, the panels of rows included, in the order of the
/// JSON. Panics on a panel other than a row that has no query.
pub fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    collect(&dashboard["panels"], &mut out);
    out
}

fn collect(panels: &Value, out: &mut Vec<Query>) {
    for panel in panels.as_array().map(Vec::as_slice).unwrap_or_default() {
        let title = panel["title"].as_str().unwrap_or_default();
        if panel["type"] == "row" {
            collect(&panel["panels"], out);
            continue;
        }
        let before = out.len();
        for target in panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without an expr"));
            out.push(Query {
                panel: title.to_owned(),
                expr: expr.to_owned(),
            });
        }
        assert!(out.len() > before, "panel {title:?} has no query");
    }
}

/// `expr` with each template variable of `vars` (name without `$`) replaced by its value,
/// written `$name` or `${name}`. Panics if a `$` is left: a variable the test did not fill.
pub fn fill(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut vars = vars.to_vec();
    // `$job` must not eat the start of a longer name such as `$jobs`.
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_owned();
    for (name, value) in vars {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$'),
        "a template variable left unfilled in {out:?}"
    );
    out
}

/// A template variable whose values Grafana reads from Prometheus:
/// `label_values(selector, label)`.
#[derive(Clone, Debug)]
pub struct Variable {
    pub name: String,
    pub selector: String,
    pub label: String,
}

/// The dashboard's variables of type `query`. Panics on one that is not `label_values`
/// of a selector and a label.
pub fn variables(dashboard: &Value) -> Vec<Variable> {
    let list = dashboard["templating"]["list"].as_array();
    list.map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let definition = v["definition"].as_str().unwrap_or_default();
            let (selector, label) = definition
                .strip_prefix("label_values(")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|args| args.rsplit_once(','))
                .unwrap_or_else(|| {
                    panic!("variable {name}: {definition:?} is not label_values(selector, label)")
                });
            Variable {
                name,
                selector: selector.trim().to_owned(),
                label: label.trim().to_owned(),
            }
        })
        .collect()
}
