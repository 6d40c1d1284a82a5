//! `compose.yaml` cannot be started here (no Docker engine), so it is kept
//! honest by reading it: it parses, every service it depends on exists, every
//! command is one the binaries accept, and every environment key is one the
//! configuration knows (an unknown `CONVEYOR__…` key fails to load); and its
//! nginx configuration is the one `nginx -t` accepts and scripts/stack runs.

use clap::Parser as _;
use shared::config::Settings;
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::{deployed_settings, root, strings};

fn compose() -> Yaml {
    let text = std::fs::read_to_string(root().join("compose.yaml")).expect("compose.yaml exists");
    let mut docs = YamlLoader::load_from_str(&text).expect("compose.yaml parses");
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

/// A service's environment as pairs, with `<<` merge keys resolved.
fn environment(service: &Yaml) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let Some(map) = service["environment"].as_hash() else {
        return env;
    };
    for (key, value) in map {
        match (key.as_str(), value) {
            (Some("<<"), Yaml::Hash(merged)) => {
                for (k, v) in merged {
                    env.push((k.as_str().unwrap_or_default().to_owned(), scalar(v)));
                }
            }
            (Some(key), value) => env.push((key.to_owned(), scalar(value))),
            (None, _) => panic!("non-string environment key in {service:?}"),
        }
    }
    env
}

fn scalar(value: &Yaml) -> String {
    match value {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("environment values must be scalars, not {other:?}"),
    }
}

#[test]
fn compose_services_run_commands_and_settings_the_code_accepts() {
    let compose = compose();
    let services = compose["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for expected in ["postgres", "rabbitmq", "redis", "migrate", "api", "worker", "nginx"] {
        assert!(names.contains(&expected), "compose.yaml lacks service {expected}");
    }

    let mut built = 0;
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        if let Some(deps) = service["depends_on"].as_hash() {
            for dep in deps.keys().filter_map(Yaml::as_str) {
                assert!(names.contains(&dep), "{name} depends on unknown service {dep}");
            }
        }
        if service["build"].as_str() != Some(".") {
            continue;
        }
        built += 1;
        let settings = deployed_settings(name, &environment(service));
        let command = strings(&service["command"]);
        match command.first().map(String::as_str) {
            Some("api") => {
                api::cli::Cli::try_parse_from(&command).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Some("worker") => {
                let cli = worker::cli::Cli::try_parse_from(&command).unwrap_or_else(|e| panic!("{name}: {e}"));
                let queues = cli.queues.unwrap_or(settings.worker.queues.clone());
                settings.check_worker_queues(&queues).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            other => panic!("{name}: unexpected command {other:?}"),
        }
    }
    assert_eq!(built, 3, "migrate, api and worker run the project's image");
    let api = &services[&Yaml::from_str("api")];
    assert_eq!(api["environment"]["CONVEYOR__HTTP__HOST"].as_str(), Some("0.0.0.0"));
    // Replicas share the rate limiter's buckets, in the compose's Redis.
    let settings = Settings::from_layers(None, &environment(api)).expect("the api's settings");
    assert_eq!(format!("{:?}", settings.rate_limit.backend), "Redis");
    let redis_host = settings.rate_limit.redis_url.split("//").nth(1).and_then(|rest| rest.split(':').next());
    assert!(names.contains(&redis_host.expect("a redis host")), "{}", settings.rate_limit.redis_url);
    assert!(!settings.http.trusted_proxies.is_empty(), "behind nginx, X-Forwarded-For names the client");
}

/// Every long-running service says when it is healthy.
#[test]
fn every_long_running_service_has_a_health_check() {
    let compose = compose();
    for (name, service) in compose["services"].as_hash().expect("services") {
        let name = name.as_str().expect("service name");
        if service["restart"].as_str() == Some("no") {
            continue; // one-shot
        }
        assert!(!service["healthcheck"]["test"].is_badvalue(), "{name} has no health check");
    }
}

/// The image (which Docker cannot build here) is read instead: built in
/// stages, its dependencies in a layer that source edits do not invalidate,
/// run as a user other than root, with a health check of its own.
#[test]
fn the_dockerfile_builds_in_stages_caches_dependencies_and_runs_unprivileged() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let position = |prefix: &str| lines.iter().position(|line| line.starts_with(prefix));
    assert_eq!(lines.iter().filter(|line| line.starts_with("FROM ")).count(), 2, "a build stage and a runtime stage");
    let manifests = position("COPY Cargo.toml Cargo.lock").expect("the manifests copied on their own");
    let sources = position("COPY . .").expect("the sources copied");
    let first_build = lines.iter().position(|line| line.contains("cargo build --release --locked")).expect("a build");
    assert!(manifests < first_build && first_build < sources, "dependencies built before the sources arrive");
    for member in ["api", "worker", "shared", "bench"] {
        assert!(
            position(&format!("COPY {member}/Cargo.toml")).is_some(),
            "{member}'s manifest in the dependency layer"
        );
    }
    let user = lines.iter().rev().find_map(|line| line.strip_prefix("USER ")).expect("a USER");
    assert!(!["root", "0"].contains(&user), "runs as {user}");
    assert!(position("HEALTHCHECK ").is_some(), "a HEALTHCHECK");
}

#[test]
fn files_compose_refers_to_exist() {
    assert!(root().join("Dockerfile").is_file(), "Dockerfile is missing");
    let compose = compose();
    let services = compose["services"].as_hash().expect("services");
    let mut mounted = Vec::new();
    for (name, service) in services {
        for volume in strings(&service["volumes"]) {
            let Some(source) = volume.split(':').next().and_then(|source| source.strip_prefix("./")) else {
                continue;
            };
            assert!(root().join(source).exists(), "{name:?} mounts {source}, which is missing");
            mounted.push(source.to_owned());
        }
    }
    for file in [
        "deploy/nginx.conf",
        "deploy/nginx-upstream.conf",
        "deploy/prometheus.yml",
        "deploy/alerts.yml",
        "deploy/grafana/dashboards",
    ] {
        assert!(mounted.iter().any(|m| m == file), "compose.yaml does not mount {file}: {mounted:?}");
    }
}

/// `docker compose --profile observability up` adds Prometheus and Grafana;
/// a plain `up` does not.
#[test]
fn the_observability_profile_adds_prometheus_and_grafana() {
    let compose = compose();
    for name in ["prometheus", "grafana"] {
        let service = &compose["services"][name];
        assert_eq!(strings(&service["profiles"]), ["observability"], "{name}");
        assert!(!service["healthcheck"].is_badvalue(), "{name} has a health check");
    }
    let profiled = compose["services"].as_hash().expect("services").values().filter(|s| !s["profiles"].is_badvalue());
    assert_eq!(profiled.count(), 2, "only the observability services are behind a profile");
}

/// nginx itself (Debian's, unpacked by scripts/setup) accepts
/// deploy/nginx.conf as scripts/stack runs it: in a main configuration of
/// its own, with the replicas it started as the upstream.
#[test]
fn nginx_accepts_the_shipped_configuration() {
    let checked =
        std::process::Command::new(root().join("scripts/stack")).arg("check").output().expect("scripts/stack runs");
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "nginx -t refused deploy/nginx.conf: {said}");
    assert!(said.contains("test is successful"), "{said}");
}

/// compose's nginx gets the replicas where deploy/nginx.conf looks for them,
/// by the `api` service's name and port, and lets through every body the API
/// accepts (the API answers what is too large).
#[test]
fn compose_points_nginx_at_the_api_replicas() {
    let compose = compose();
    let services = &compose["services"];
    let volumes = strings(&services["nginx"]["volumes"]);
    assert!(
        volumes.contains(&"./deploy/nginx-upstream.conf:/etc/nginx/conveyor-upstream.conf:ro".to_owned()),
        "{volumes:?}"
    );
    let shared = std::fs::read_to_string(root().join("deploy/nginx.conf")).expect("deploy/nginx.conf");
    assert!(shared.contains("include conveyor-upstream.conf;"), "deploy/nginx.conf includes the upstream file");

    let port = services["api"]["environment"]["CONVEYOR__HTTP__PORT"].as_str().expect("the api's port");
    let upstream = std::fs::read_to_string(root().join("deploy/nginx-upstream.conf")).expect("upstream file");
    let servers: Vec<&str> = upstream.lines().filter(|line| line.starts_with("server ")).collect();
    assert_eq!(servers.len(), 1, "{upstream}");
    assert!(servers[0].starts_with(&format!("server api:{port} resolve ")), "{}", servers[0]);

    let limit = shared
        .lines()
        .find_map(|line| line.trim().strip_prefix("client_max_body_size ")?.strip_suffix("m;")?.parse::<usize>().ok())
        .expect("client_max_body_size in MiB");
    let settings = Settings::from_layers(None, &[]).expect("defaults");
    assert!(limit * 1024 * 1024 > settings.http.body_limit_bytes, "nginx must let through what the API accepts");
}
