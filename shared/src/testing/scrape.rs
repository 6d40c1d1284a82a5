//! Reading a Prometheus text exposition in tests: its samples by label, and
//! a check that Prometheus' own parser (the Python client's, installed by
//! `scripts/setup`) accepts it.

use std::collections::BTreeMap;

/// The samples of `family` in a Prometheus text exposition, by their labels
/// (`name="value"` pairs, sorted), parsed line by line.
pub fn samples(text: &str, family: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut labels: Vec<&str> = labels.split(',').filter(|label| !label.is_empty()).collect();
            labels.sort_unstable();
            (name == family).then(|| (labels.join(","), value.parse().unwrap_or(f64::NAN)))
        })
        .collect()
}

/// Fails unless Prometheus' own Python client parses `text` (installed by
/// `scripts/setup`); returns how many metric families it read.
pub fn parses_as_prometheus(text: &str) -> usize {
    use std::io::Write as _;
    let parser = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families\n\
                  families = list(text_string_to_metric_families(sys.stdin.read()))\nprint(len(families))";
    let mut python = std::process::Command::new("python3")
        .args(["-c", parser])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/setup installs the parser)");
    python.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("written");
    let parsed = python.wait_with_output().expect("python3 ends");
    let said = String::from_utf8_lossy(&parsed.stderr);
    assert!(parsed.status.success(), "prometheus_client refused the exposition (scripts/setup installs it): {said}");
    String::from_utf8_lossy(&parsed.stdout).trim().parse::<usize>().unwrap_or(0)
}
