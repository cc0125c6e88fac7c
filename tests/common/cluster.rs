//! A real multi-node MQTT broker for the fleet tests: N aedes nodes sharing retained messages,
//! sessions, wills and routing through one Redis (tests/cluster/README.md says why this one).
//! Every node serves mqtt:// and wss:// on free loopback ports, with certificates made now.

use super::*;

const NODE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster/node.mjs");
const NODE_MODULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster/node_modules");

pub struct Cluster {
    dir: tempfile::TempDir,
    redis: Child,
    redis_port: u16,
    nodes: Vec<Node>,
}

struct Node {
    plain: u16,
    wss: u16,
    child: Option<Child>,
}

impl Cluster {
    /// Redis and `n` nodes, each accepting connections.
    pub fn start(n: usize) -> Cluster {
        assert!(
            Path::new(NODE_MODULES).is_dir(),
            "{NODE_MODULES} is missing: run tests/setup-deps (npm ci in tests/cluster)"
        );
        let dir = tempfile::Builder::new().prefix("tether-cluster-").tempdir().unwrap();
        fs::write(dir.path().join("openssl.cnf"), OPENSSL_CNF).unwrap();
        make_ca(dir.path(), "ca", "Tether-Test-CA");
        make_leaf(dir.path(), "ca", "server", "localhost", "server");
        let redis_port = free_port();
        let redis = start_redis(dir.path(), redis_port);
        let nodes = (0..n).map(|_| Node { plain: free_port(), wss: free_port(), child: None }).collect();
        let mut cluster = Cluster { dir, redis, redis_port, nodes };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    /// Node `i`'s plain MQTT port, for raw clients, `Sub` and `publish_at`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].plain
    }

    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].plain)
    }

    pub fn wss_url(&self, i: usize) -> String {
        format!("wss://localhost:{}/mqtt", self.nodes[i].wss)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Every node's mqtt:// URL, starting with node `first`: an agent's `broker.url`.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n).map(|k| self.url((first + k) % n)).collect()
    }

    /// An agent config for `device_id` on the cluster, trying node `first` first.
    pub fn agent_config(&self, device_id: &str, first: usize) -> Value {
        json!({
            "broker": { "url": self.urls_from(first), "keepalive_s": 5, "connect_timeout_s": 3 },
            "device_id": device_id,
            "heartbeat": { "interval_s": 1, "disks": ["/"] },
            "reconnect": { "min_s": 1, "max_s": 2 },
            "reboot_command": ["/bin/false"],
            "trust": { "authorized_keys": operator_authorized_keys(self.dir.path()) },
        })
    }

    /// Node `i` dies at once (SIGKILL): its connections drop, the others publish its wills.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn start_node(&mut self, i: usize) {
        let log = File::create(self.dir.path().join(format!("node{i}.log"))).unwrap();
        let node = &self.nodes[i];
        let child = Command::new("node")
            .arg(NODE_SCRIPT)
            .env("NODE_ID", format!("n{i}"))
            .env("MQTT_PORT", node.plain.to_string())
            .env("WSS_PORT", node.wss.to_string())
            .env("REDIS_PORT", self.redis_port.to_string())
            .env("TLS_CERT", self.dir.path().join("server.pem"))
            .env("TLS_KEY", self.dir.path().join("server.key"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("node (Node.js) runs: see tests/setup-deps");
        let ports = [node.plain, node.wss];
        self.nodes[i].child = Some(child);
        for port in ports {
            assert!(wait_until(secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok()), "node {i} up");
        }
    }

    /// The nodes' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| {
                let log =
                    fs::read_to_string(self.dir.path().join(format!("node{i}.log"))).unwrap_or_default();
                format!("----- node {i} -----\n{log}")
            })
            .collect()
    }
}

fn start_redis(dir: &Path, port: u16) -> Child {
    let log = File::create(dir.join("redis.log")).unwrap();
    // No persistence (a test cluster), and no output limit for pub/sub: by default Redis cuts
    // off a node that is sent a 100 MiB message.
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--client-output-buffer-limit", "pubsub 0 0 0", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("redis-server runs: see tests/setup-deps");
    assert!(wait_until(secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()), "redis up");
    child
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = self.redis.kill();
        let _ = self.redis.wait();
    }
}
