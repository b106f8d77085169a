//! Hosts for the multi-host test: one network namespace each, joined by a bridge through
//! veth pairs, with a hosts file that `ip netns exec` mounts over /etc/hosts.

use std::path::PathBuf;
use std::process::Command;

/// Runs `ip` (or another command) and returns its error output if it failed.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A bridge and the namespaces on it; all of it is removed when dropped.
pub struct Net {
    /// Unique to this run: prefixes every name.
    tag: String,
    bridge: String,
    /// The first three octets of the /24.
    subnet: String,
    hosts: Vec<(String, String)>,
}

impl Net {
    /// A bridge at `<subnet>.1/24`. Err with the reason where namespaces cannot be made.
    pub fn new() -> Result<Net, String> {
        let pid = std::process::id();
        let tag = format!("sy{}", pid % 100_000);
        let subnet = format!("10.{}.{}", 180 + pid % 50, (pid / 50) % 250);
        let net = Net {
            bridge: format!("{tag}br"),
            tag,
            subnet,
            hosts: Vec::new(),
        };
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.gateway()),
                "dev",
                &net.bridge,
            ],
        )?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The root namespace's address on the bridge.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet)
    }

    pub fn address(&self, octet: u8) -> String {
        format!("{}.{octet}", self.subnet)
    }

    /// A namespace named after `host`, at `<subnet>.<octet>`; returns the namespace's name.
    pub fn add_host(&mut self, host: &str, octet: u8) -> Result<String, String> {
        let namespace = format!("{}-{host}", self.tag);
        let outside = format!("{}v{octet}", self.tag);
        let inside = format!("{}p{octet}", self.tag);
        run("ip", &["netns", "add", &namespace])?;
        self.hosts.push((namespace.clone(), outside.clone()));
        run(
            "ip",
            &[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ],
        )?;
        run("ip", &["link", "set", &inside, "netns", &namespace])?;
        run("ip", &["link", "set", &outside, "master", &self.bridge])?;
        run("ip", &["link", "set", &outside, "up"])?;
        let exec = |args: &[&str]| {
            let mut full = vec!["netns", "exec", namespace.as_str(), "ip"];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        exec(&[
            "addr",
            "add",
            &format!("{}/24", self.address(octet)),
            "dev",
            &inside,
        ])?;
        exec(&["link", "set", &inside, "up"])?;
        exec(&["link", "set", "lo", "up"])?;
        exec(&["route", "add", "default", "via", &self.gateway()])?;
        Ok(namespace)
    }

    /// Writes the hosts file every namespace sees as /etc/hosts.
    pub fn set_hosts(&self, lines: &str) -> Result<(), String> {
        for (namespace, _) in &self.hosts {
            let dir = PathBuf::from("/etc/netns").join(namespace);
            std::fs::create_dir_all(&dir).map_err(|error| format!("{dir:?}: {error}"))?;
            std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{lines}"))
                .map_err(|error| format!("hosts: {error}"))?;
        }
        Ok(())
    }

    /// Cuts (or restores) a host's link to the bridge.
    pub fn set_link(&self, namespace: &str, up: bool) -> Result<(), String> {
        let (_, outside) = self
            .hosts
            .iter()
            .find(|(name, _)| name == namespace)
            .ok_or_else(|| format!("no host {namespace}"))?;
        run(
            "ip",
            &["link", "set", outside, if up { "up" } else { "down" }],
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (namespace, outside) in &self.hosts {
            let _ = run("ip", &["link", "del", outside]);
            let _ = run("ip", &["netns", "del", namespace]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(namespace));
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}
