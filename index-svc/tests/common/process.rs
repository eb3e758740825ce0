//! The `index-svc` binary as a child process on a loopback port chosen at
//! run time.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use densebert4ret_proto::v1::index_client::IndexClient;
use tonic::transport::Channel;

/// Longest wait for the binary to recover its data and log its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `index-svc` process, killed on drop.
pub struct ShardProcess {
    child: Child,
    /// gRPC address the process listens on.
    pub address: SocketAddr,
    /// Log lines the process wrote to stderr so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ShardProcess {
    /// Starts the binary on `data_dir` with settings from `INDEX__*`
    /// variables, and waits until it serves.
    pub fn start(data_dir: &Path, settings: &[(&str, &str)]) -> Self {
        match Self::try_start(data_dir, settings) {
            Ok(process) => process,
            Err((status, log)) => panic!("index-svc exited with {status} before serving:\n{log}"),
        }
    }

    /// Starts the binary like [`ShardProcess::start`]. Returns the exit
    /// status and the log when the process stops before serving.
    pub fn try_start(
        data_dir: &Path,
        settings: &[(&str, &str)],
    ) -> Result<Self, (ExitStatus, String)> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_index-svc"));
        command
            .env("INDEX__LISTEN", "127.0.0.1:0")
            .env("INDEX__DATA_DIR", data_dir)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in settings {
            command.env(format!("INDEX__{}", key.to_uppercase()), value);
        }
        let mut child = command.spawn().expect("the index-svc binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving gRPC") {
                    let address = line
                        .split("\"address\":\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .and_then(|address| address.parse::<SocketAddr>().ok());
                    let _ = sender.send(address);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            match receiver.recv_timeout(Duration::from_millis(100)) {
                Ok(address) => {
                    let address = address.expect("the serving line has an address field");
                    return Ok(Self {
                        child,
                        address,
                        log,
                    });
                }
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        // Let the reader thread drain the last lines.
                        std::thread::sleep(Duration::from_millis(200));
                        let text = log.lock().unwrap().join("\n");
                        return Err((status, text));
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "index-svc did not serve within {START_TIMEOUT:?}"
                    );
                }
            }
        }
    }

    /// Connects a gRPC client.
    pub async fn client(&self) -> IndexClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .expect("connect to index-svc");
        IndexClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL index-svc");
        self.child.wait().expect("reap index-svc");
    }
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
