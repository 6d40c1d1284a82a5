//! deploy/k8s, which no cluster runs here, kept honest: every manifest
//! passes kubernetes-validate (strict) and KEDA's CRD schemas
//! (scripts/validate-k8s), and says what the code does: commands the
//! binaries accept, settings the configuration knows, probes on the health
//! routes' ports, and grace periods longer than the drains they cover.

use clap::Parser as _;
use shared::config::Settings;
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::{deployed_settings, root, strings};

/// Every document of deploy/k8s/<file>.
fn documents(file: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join("deploy/k8s").join(file)).expect("the manifest exists");
    YamlLoader::load_from_str(&text).expect("the manifest parses")
}

/// The `kind` document of deploy/k8s/<file>.
fn document(file: &str, kind: &str) -> Yaml {
    documents(file).into_iter().find(|doc| doc["kind"].as_str() == Some(kind)).expect("the kind is there")
}

#[test]
fn the_manifests_pass_kubernetes_and_keda_schemas() {
    let checked = std::process::Command::new(root().join("scripts/validate-k8s")).output().expect("it runs");
    let said = String::from_utf8_lossy(&checked.stdout) + String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "deploy/k8s does not validate: {said}");
    assert!(said.contains("2 KEDA resources checked"), "{said}");
}

/// The container of a Deployment, and the settings its environment gives
/// (the ConfigMap, the Secret with its placeholders, its own `env`).
fn container_and_settings(file: &str) -> (Yaml, Settings) {
    let deployment = document(file, "Deployment");
    let container = deployment["spec"]["template"]["spec"]["containers"][0].clone();
    let mut env = Vec::new();
    for (source, kind) in [("config.yaml", "ConfigMap"), ("secret.yaml", "Secret")] {
        let doc = document(source, kind);
        let data = if kind == "Secret" { &doc["stringData"] } else { &doc["data"] };
        for (key, value) in data.as_hash().expect("data") {
            let key = key.as_str().expect("a string key");
            // Read by KEDA, not by Conveyor.
            if key != "RABBITMQ_MANAGEMENT_URL" {
                env.push((key.to_owned(), value.as_str().expect("a string value").to_owned()));
            }
        }
    }
    for pair in container["env"].as_vec().expect("env") {
        env.push((pair["name"].as_str().expect("name").to_owned(), pair["value"].as_str().expect("value").to_owned()));
    }
    (container, deployed_settings(file, &env))
}

fn probe_port(container: &Yaml, probe: &str) -> i64 {
    let port = container[probe]["httpGet"]["port"].as_str().expect("a named port");
    container["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(port))
        .and_then(|p| p["containerPort"].as_i64())
        .expect("the named port is declared")
}

#[test]
fn the_manifests_run_what_the_code_accepts() {
    let (api, settings) = container_and_settings("api.yaml");
    api::cli::Cli::try_parse_from(strings(&api["args"])).expect("the API's command");
    assert_eq!(probe_port(&api, "readinessProbe"), i64::from(settings.http.port));
    assert_eq!(api["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(api["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let api_pod = &document("api.yaml", "Deployment")["spec"]["template"]["spec"];
    let pre_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().expect("a preStop sleep");
    let grace = api_pod["terminationGracePeriodSeconds"].as_i64().expect("a grace period");
    let drain_seconds = i64::try_from(settings.http.drain_ms.div_ceil(1000)).expect("seconds");
    assert!(grace > pre_stop + drain_seconds, "the API's grace period covers its preStop and drain");

    let (worker, settings) = container_and_settings("worker.yaml");
    let cli = worker::cli::Cli::try_parse_from(strings(&worker["args"])).expect("the worker's command");
    settings.check_worker_queues(&cli.queues.unwrap_or(settings.worker.queues.clone())).expect("its queues");
    assert_eq!(probe_port(&worker, "readinessProbe"), i64::from(settings.worker.http_port));
    let worker_pod = &document("worker.yaml", "Deployment")["spec"]["template"]["spec"];
    let grace = worker_pod["terminationGracePeriodSeconds"].as_i64().expect("a grace period");
    assert!(
        grace > i64::try_from(settings.worker.shutdown_grace_seconds).expect("seconds"),
        "running jobs finish before the kubelet kills the worker"
    );

    let migrate = &document("migrate.yaml", "Job")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strings(&migrate["args"]), ["api", "migrate"]);
    api::cli::Cli::try_parse_from(strings(&migrate["args"])).expect("the migration's command");
}

/// KEDA watches the RabbitMQ queues the workers consume: every lane of
/// their queue, by name.
#[test]
fn keda_watches_the_worker_queues_lanes() {
    let (worker, settings) = container_and_settings("worker.yaml");
    let cli = worker::cli::Cli::try_parse_from(strings(&worker["args"])).expect("the worker's command");
    let queues = cli.queues.unwrap_or(settings.worker.queues.clone());
    let scaled = document("worker-scaling.yaml", "ScaledObject");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"].as_str(), Some("conveyor-worker"));
    let trigger = &scaled["spec"]["triggers"][0]["metadata"];
    assert_eq!(trigger["useRegex"].as_str(), Some("true"));
    assert_eq!(trigger["operation"].as_str(), Some("sum"));
    let pattern = trigger["queueName"].as_str().expect("a queue pattern");
    let names = shared::queue::Names::new(&settings.amqp.namespace);
    for queue in &queues {
        for lane in names.lanes(queue, settings.amqp.lanes) {
            assert!(matches_anchored(pattern, &lane), "{pattern} misses {lane}");
        }
    }
    // Nor another queue whose name merely starts the same.
    for queue in &queues {
        let other = names.queue(&format!("{queue}s"));
        assert!(!matches_anchored(pattern, &other), "{pattern} takes {other}");
    }
}

/// `^<name>(\.[0-9]+)?$` with `<name>`'s dots escaped: the one shape the
/// pattern has, checked without a regex engine.
fn matches_anchored(pattern: &str, name: &str) -> bool {
    let Some(base) = pattern.strip_prefix('^').and_then(|p| p.strip_suffix(r"(\.[0-9]+)?$")) else {
        panic!("unexpected pattern shape {pattern}");
    };
    let base = base.replace(r"\.", ".");
    match name.strip_prefix(&base) {
        Some("") => true,
        Some(rest) => rest.strip_prefix('.').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}
