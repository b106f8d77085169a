//! What a rendered manifest tells a container to run: its command line, its environment
//! (with `valueFrom` resolved against the rendered ConfigMaps, the test's Secret and the
//! downward API), its mounted files (written under a test root), its probes and its preStop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The image's entrypoint, which the manifests' commands name.
pub const ENTRYPOINT: &str = "/usr/local/bin/switchyard";

/// The objects `kubectl kustomize DIR` renders, as JSON values.
pub fn render(overlay: &Path) -> Result<Vec<Value>, String> {
    let tools = std::env::var("SWITCHYARD_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/switchyard-tools")
        });
    let kubectl = [tools.join("bin/kubectl"), PathBuf::from("kubectl")]
        .into_iter()
        .find(|path| path.is_file() || path == Path::new("kubectl"))
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    let rendered = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(overlay)
        .output()
        .map_err(|error| format!("{kubectl:?}: {error} (deploy/validate.sh installs it)"))?;
    if !rendered.status.success() {
        return Err(String::from_utf8_lossy(&rendered.stderr).into_owned());
    }
    // YAML to JSON with PyYAML (which kubernetes-validate brings).
    let mut python = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("python3: {error}"))?;
    {
        use std::io::Write;
        python
            .stdin
            .take()
            .unwrap()
            .write_all(&rendered.stdout)
            .map_err(|error| error.to_string())?;
    }
    let output = python
        .wait_with_output()
        .map_err(|error| error.to_string())?;
    if !output.status.success() {
        return Err("python3 with PyYAML could not read the rendered YAML".into());
    }
    serde_json::from_slice(&output.stdout).map_err(|error| error.to_string())
}

pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the rendered manifests have no {kind} {name}"))
}

/// One container of a pod, ready to run as a process.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub readiness: (u16, String),
    pub liveness_port: u16,
    pub pre_stop: Option<Vec<String>>,
    pub termination_grace_seconds: u64,
}

/// The pod `pod_name` of `workload` (a Deployment or StatefulSet), its files written under
/// `root/<pod_name>`, its secrets taken from `secret` (the test's `switchyard-secrets`).
pub fn pod(
    objects: &[Value],
    workload: &Value,
    pod_name: &str,
    secret: &BTreeMap<String, String>,
    root: &Path,
) -> Pod {
    let namespace = workload["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let spec = &workload["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let config_map = |name: &str| -> BTreeMap<String, String> {
        find(objects, "ConfigMap", name)["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(key, value)| (key.clone(), value.as_str().unwrap().to_string()))
            .collect()
    };
    let secret_value = |name: &str, key: &str| -> String {
        assert_eq!(
            name, "switchyard-secrets",
            "a Secret the test does not make"
        );
        secret
            .get(key)
            .unwrap_or_else(|| panic!("the manifests want key {key} of {name}"))
            .clone()
    };
    let pod_root = root.join(pod_name);
    // Files: each mount's volume written at the mount path, under the pod's root.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let mount_path = mount["mountPath"].as_str().unwrap();
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|volume| volume["name"] == mount["name"])
            .unwrap();
        let dir = pod_root.join(mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        let files: BTreeMap<String, String> =
            if let Some(name) = volume["secret"]["secretName"].as_str() {
                assert_eq!(name, "switchyard-secrets");
                secret.clone()
            } else if let Some(name) = volume["configMap"]["name"].as_str() {
                let data = config_map(name);
                match volume["configMap"]["items"].as_array() {
                    Some(items) => items
                        .iter()
                        .map(|item| {
                            let key = item["key"].as_str().unwrap();
                            (
                                item["path"].as_str().unwrap().to_string(),
                                data[key].clone(),
                            )
                        })
                        .collect(),
                    None => data,
                }
            } else {
                BTreeMap::new() // emptyDir
            };
        for (file, content) in files {
            std::fs::write(dir.join(file), content).unwrap();
        }
        mounts.push((mount_path.to_string(), dir));
    }
    let under_root = |value: &str| -> String {
        for (mount_path, dir) in &mounts {
            if let Some(rest) = value.strip_prefix(mount_path.as_str()) {
                return format!("{}{rest}", dir.display());
            }
        }
        value.to_string()
    };
    // Environment: envFrom, then env (which may refer to what came before as $(NAME)).
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, name: &str, value: String| {
        env.retain(|(known, _)| known != name);
        env.push((name.to_string(), value));
    };
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"].as_str().unwrap();
        for (key, value) in config_map(name) {
            // As the kubelet does: keys that are not variable names are skipped.
            if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                set(&mut env, &key, under_root(&value));
            }
        }
    }
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap();
        let value = if let Some(value) = variable["value"].as_str() {
            expand(value, &env)
        } else if let Some(field) = variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => pod_name.to_string(),
                "metadata.namespace" => namespace.to_string(),
                other => panic!("the test does not know the downward API field {other}"),
            }
        } else if let Some(reference) = variable["valueFrom"]["secretKeyRef"].as_object() {
            secret_value(
                reference["name"].as_str().unwrap(),
                reference["key"].as_str().unwrap(),
            )
        } else if let Some(reference) = variable["valueFrom"]["configMapKeyRef"].as_object() {
            config_map(reference["name"].as_str().unwrap())[reference["key"].as_str().unwrap()]
                .clone()
        } else {
            panic!("the test does not know how to resolve {variable}");
        };
        set(&mut env, name, under_root(&value));
    }
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .map(|part| expand(part.as_str().unwrap(), &env))
            .collect()
    };
    let port = |probe: &Value| probe["grpc"]["port"].as_u64().expect("a gRPC probe") as u16;
    Pod {
        name: pod_name.to_string(),
        args: strings(&container["args"]),
        readiness: (
            port(&container["readinessProbe"]),
            container["readinessProbe"]["grpc"]["service"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ),
        liveness_port: port(&container["livenessProbe"]),
        pre_stop: container["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .map(|_| strings(&container["lifecycle"]["preStop"]["exec"]["command"])),
        termination_grace_seconds: spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
        env,
    }
}

/// `$(NAME)` references to variables defined before, as Kubernetes expands them.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (name, known) in env {
        out = out.replace(&format!("$({name})"), known);
    }
    out
}
