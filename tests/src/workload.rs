//! A Workload API client over a connection it is given, and the passing of such
//! a connection between processes (`SCM_RIGHTS`).
//!
//! SPIFFE libraries dial the socket themselves, so the process that asks is the
//! process that connected. Attestation must hold when they differ (a connection
//! inherited or passed on); these helpers let a test make the call from one
//! process over a connection another process made.

use std::{
    io::{IoSliceMut, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use connect_agent::workload::{
    proto::{X509svidRequest, spiffe_workload_api_client::SpiffeWorkloadApiClient},
    server::SECURITY_HEADER,
};

/// A python3 (stdlib only) program: connects to the Workload API socket
/// `argv[1]`, passes that connection to the test over the socket `argv[2]`, prints
/// its PID and closes its own copy. With `argv[3] == "exit"` it then exits; with
/// `"stay"` it first waits for a line on stdin (so that a process the test does
/// not keep never connects) and after the hand-over lives until stdin closes.
pub const HAND_OVER: &str = r#"
import os, socket, sys
stay = sys.argv[3] == "stay"
if stay:
    sys.stdin.readline()
agent = socket.socket(socket.AF_UNIX)
agent.connect(sys.argv[1])
back = socket.socket(socket.AF_UNIX)
back.connect(sys.argv[2])
socket.send_fds(back, [b"fd"], [agent.fileno()])
back.close()
agent.close()
print("pid=%d" % os.getpid(), flush=True)
if stay:
    sys.stdin.read()
"#;

/// [`HAND_OVER`] `stay` inside a cgroup, killed by its PID on drop.
#[derive(Debug)]
pub struct Holder {
    child: Option<Child>,
}

impl Holder {
    /// Starts it in `cgroup` (moved there before python runs); it connects to
    /// `socket` and passes the connection over `hand_over` once [`Holder::go`].
    pub fn spawn(cgroup: &Path, socket: &Path, hand_over: &Path) -> Result<Self> {
        let child = xtask::command_in(
            Some(cgroup),
            None,
            "python3",
            &[
                "-c",
                HAND_OVER,
                &socket.to_string_lossy(),
                &hand_over.to_string_lossy(),
                "stay",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting python3 in {}", cgroup.display()))?;
        Ok(Self { child: Some(child) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Lets it connect and hand the connection over.
    pub fn go(&mut self) -> Result<()> {
        let stdin = self
            .child
            .as_mut()
            .and_then(|c| c.stdin.as_mut())
            .context("its stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Receives one descriptor passed over a connection to `listener` (as
/// [`HAND_OVER`] passes it), within `timeout`.
pub fn receive_connection(listener: &UnixListener, timeout: Duration) -> Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no descriptor was passed within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting the hand-over connection"),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("recvmsg on the hand-over connection")?;
    for c in msg.cmsgs().context("the control messages")? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            #[allow(unsafe_code)]
            // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing else
            // owns it (any further descriptors in the message are not used).
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(UnixStream::from(fd));
        }
    }
    bail!("the hand-over message carried no descriptor")
}

/// What `FetchX509SVID` answered: the SPIFFE IDs of its first message, or the
/// status the call ended with.
pub type Fetched = std::result::Result<Vec<String>, tonic::Status>;

/// `FetchX509SVID`, with the security header, over `stream` (a connection to an
/// agent's Workload API socket, made by whichever process): the first message's
/// SPIFFE IDs, or the status. Fails (the outer error) only when no answer came
/// within `timeout` or the connection could not carry HTTP/2.
pub fn fetch_x509_svid_over(stream: UnixStream, timeout: Duration) -> Result<Fetched> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a tokio runtime")?;
    rt.block_on(async move {
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        // The channel's connector hands out this one connection: a reconnect
        // must not dial the socket anew (that would be this process connecting).
        let slot = Arc::new(Mutex::new(Some(stream)));
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let s = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            async move {
                let s =
                    s.ok_or_else(|| std::io::Error::other("the given connection is used up"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        });
        let call = async {
            let channel = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(connector)
                .await
                .context("HTTP/2 over the given connection")?;
            let mut client = SpiffeWorkloadApiClient::new(channel);
            let mut req = tonic::Request::new(X509svidRequest {});
            req.metadata_mut().insert(
                SECURITY_HEADER,
                tonic::metadata::MetadataValue::from_static("true"),
            );
            let fetched = match client.fetch_x509svid(req).await {
                Err(status) => Err(status),
                Ok(resp) => match resp.into_inner().message().await {
                    Ok(Some(m)) => Ok(m.svids.into_iter().map(|s| s.spiffe_id).collect()),
                    Ok(None) => Ok(Vec::new()),
                    Err(status) => Err(status),
                },
            };
            anyhow::Ok(fetched)
        };
        tokio::time::timeout(timeout, call)
            .await
            .with_context(|| format!("FetchX509SVID did not answer within {timeout:?}"))?
    })
}

/// `FetchX509SVID` from this process, over a connection of its own to `socket`.
pub fn fetch_x509_svid(socket: &Path, timeout: Duration) -> Result<Fetched> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    fetch_x509_svid_over(stream, timeout)
}

/// The test venv's python3 (py-spiffe, py-consul, sslyze), which `cargo xtask
/// test` creates.
pub fn venv_python() -> Result<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv/bin/python3");
    if !p.is_file() {
        bail!(
            "{} is missing: `cargo xtask test` creates the venv with py-spiffe",
            p.display()
        );
    }
    Ok(p.to_string_lossy().into_owned())
}

/// A dev agent with `--cgroup` on a test cgroup of its own, `children` made
/// under it, serving the Workload API on the socket the harness gives every
/// agent ([`AgentProcess::workload_socket`]); that socket's path is returned.
pub fn agent_with_cgroups(
    name: &str,
    children: &[&str],
) -> Result<(
    crate::lab::TestCgroup,
    crate::agent::AgentProcess,
    std::path::PathBuf,
)> {
    let mut cg = crate::lab::TestCgroup::create(name)?;
    for c in children {
        cg.child(c)?;
    }
    let cgroup = cg.path.to_string_lossy().into_owned();
    let agent = crate::agent::AgentProcess::start_dev(name, &["--cgroup", &cgroup])?;
    let socket = agent
        .workload_socket
        .clone()
        .context("the harness gives every agent a Workload API socket")?;
    Ok((cg, agent, socket))
}
