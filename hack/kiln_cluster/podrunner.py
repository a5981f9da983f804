"""One pod on the node agent: its containers as local processes, its status as the kubelet would report it.

A PodRunner is a thread per pod. It materializes the volumes, runs init containers one after another, then
starts the containers and supervises them: restarts in place per restartPolicy (Always, OnFailure; Never
terminates), runs readiness probes (httpGet on the pod IP, tcpSocket, exec; at most every second; liveness
and startup probes are not run), and patches pods/status whenever something changes: phase, podIP(s),
conditions (Ready from the probe), container states with exit code, reason (Completed or Error) and
termination message (the file named by KILN_TERMINATION_LOG, else the log tail for FallbackToLogsOnError),
restart counts. On deletion it sends SIGTERM, SIGKILL after the grace period, reports the terminal phase and
removes the object with grace 0. Each container's stdout and stderr go to `<pod folder>/<container>.log`.
"""

import contextlib
import http.client
import signal
import socket
import subprocess
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln_cluster import podenv, volumes
from kiln_cluster.procs import Process
from kiln_cluster.rest import STRATEGIC, ApiError

if TYPE_CHECKING:
    from kiln_cluster.kubelet import NodeAgent

Obj = dict[str, Any]
TICK = 0.2
MAX_MESSAGE = 4096


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Container:
    """One container's spec, current process, state and probe bookkeeping."""

    def __init__(self, spec: Obj, folder: Path) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.log = folder / f"{self.name}.log"
        self.termination_log = folder / f"{self.name}.termination-log"
        self.proc: Process | None = None
        self.restarts = 0
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.ready = False
        self.restart_at: float | None = None
        self.next_probe = 0.0
        self.probe_results: list[bool] = []

    def status(self, image_id: str) -> Obj:
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": image_id,
            "containerID": f"kiln-node://{self.proc.pid}" if self.proc else "",
            "ready": self.ready,
            "started": "running" in self.state,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        }


class PodRunner(threading.Thread):
    """Runs and reports one pod; see the module docstring."""

    def __init__(self, agent: "NodeAgent", pod: Obj, ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.ip = ip
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.folder = agent.root / "pods" / self.namespace / f"{self.pod_name}-{self.uid[:8]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"
        self.policy: str = pod["spec"].get("restartPolicy", "Always")
        self.init = [Container(c, self.folder) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c, self.folder) for c in pod["spec"]["containers"]]
        self.phase = "Pending"
        self.conditions: dict[str, Obj] = {}
        self.started = now()
        self.deleting = threading.Event()
        self.grace = 30.0
        self.gone = False  # the object no longer exists: nothing to report
        self.shutdown = False  # the agent is stopping: kill, report nothing
        self._published: Obj | None = None
        self._launches: dict[str, tuple[list[str], dict[str, str], Path]] = {}

    # -- requests from the agent ----------------------------------------------------------------------------

    def request_delete(self, grace: float, gone: bool = False) -> None:
        self.grace = min(self.grace, grace) if self.deleting.is_set() else grace
        self.gone = self.gone or gone
        self.deleting.set()

    def stop(self) -> None:
        self.shutdown = True
        self.request_delete(2.0, gone=True)

    # -- the pod's life -------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._prepare() and self._run_init() and not self.deleting.is_set():
                for container in self.containers:
                    self._start(container)
                self._supervise()
            if self.deleting.is_set():
                self._terminate()
        except Exception:
            (self.folder / "agent-error.log").write_text(traceback.format_exc())
            self._kill_all(0)
            self.phase = "Failed"
            with contextlib.suppress(Exception):
                self._publish(reason="NodeAgentError")

    def _prepare(self) -> bool:
        """Volumes and launch plans; retried while a referenced object is missing, as the kubelet does."""
        self._publish()
        while not self.deleting.is_set():
            try:
                ctx = volumes.PodContext(
                    self.agent.kube, self.pod, self.folder, self.agent.claims_root, self.ip, self.agent.host_ip
                )
                folders, token = volumes.materialize(ctx)
                for container in self.init + self.containers:
                    self._launches[container.name] = self.agent.launch_plan(self, container, folders, token)
                self.conditions_set("PodReadyToStartContainers", True)
                self.conditions_set("Initialized", not self.init)
                return True
            except (volumes.VolumeNotReady, LookupError, ValueError) as err:
                for container in self.init + self.containers:
                    container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
                self._publish()
                self.deleting.wait(1.0)
        return False

    def _run_init(self) -> bool:
        """Each init container to success, in order; a failure fails the pod unless the policy retries."""
        for container in self.init:
            while True:
                self._start(container)
                while container.proc and container.proc.poll() is None and not self.deleting.is_set():
                    time.sleep(TICK)
                if self.deleting.is_set():
                    return False
                code = self._record_exit(container)
                if code == 0:
                    break
                if self.policy == "Never":
                    self.phase = "Failed"
                    self._publish()
                    return False
                self.deleting.wait(min(10.0, 2.0**container.restarts))
                container.restarts += 1
        self.conditions_set("Initialized", True)
        return True

    def _start(self, container: Container) -> None:
        argv, env, cwd = self._launches[container.name]
        container.termination_log.write_text("")
        container.proc = Process(f"{self.pod_name}/{container.name}", argv, container.log, env=env, cwd=cwd)
        container.state = {"running": {"startedAt": now()}}
        container.restart_at = None
        container.probe_results = []
        container.ready = "readinessProbe" not in container.spec
        probe = container.spec.get("readinessProbe") or {}
        container.next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        if self.phase == "Pending":
            self.phase = "Running"
        self._publish()

    def _record_exit(self, container: Container) -> int:
        """Turn an ended process into a terminated state; return its exit code (128+N for signal N)."""
        assert container.proc is not None
        code = container.proc.wait()
        code = 128 - code if code < 0 else code
        container.proc.stop(grace=0)  # reap anything the process left in its group
        message = container.termination_log.read_text(errors="replace")[-MAX_MESSAGE:].strip()
        if not message and code and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = "\n".join(container.log.read_text(errors="replace").splitlines()[-80:])[-2048:]
        terminated: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": container.state.get("running", {}).get("startedAt", now()),
            "finishedAt": now(),
            "containerID": f"kiln-node://{container.proc.pid}",
        }
        if message:
            terminated["message"] = message
        container.state = {"terminated": terminated}
        container.ready = False
        return code

    def _supervise(self) -> None:
        """Watch exits, restart per policy, probe readiness, until every container is done or deletion."""
        while not self.deleting.wait(TICK):
            for container in self.containers:
                if container.proc and "running" in container.state and container.proc.poll() is not None:
                    code = self._record_exit(container)
                    if self.policy == "Always" or (self.policy == "OnFailure" and code != 0):
                        container.last_state = container.state
                        container.state = {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed"}}
                        container.restart_at = time.monotonic() + min(10.0, 2.0**container.restarts)
                    self._publish()
                if container.restart_at is not None and time.monotonic() >= container.restart_at:
                    container.restarts += 1
                    self._start(container)
                if "running" in container.state and time.monotonic() >= container.next_probe:
                    self._probe(container)
            if all("terminated" in c.state for c in self.containers):
                failed = any(c.state["terminated"]["exitCode"] for c in self.containers)
                self.phase = "Failed" if failed else "Succeeded"
                self._publish()
                return
            self._publish()

    def _terminate(self) -> None:
        """Deletion: TERM, KILL after the grace period, report the terminal phase, remove the object."""
        self._kill_all(self.grace)
        if self.shutdown or self.gone:
            return
        exits = [c.state.get("terminated", {}).get("exitCode", 0) for c in self.containers]
        self.phase = "Succeeded" if self.phase == "Succeeded" or not any(exits) else "Failed"
        self._publish()
        try:
            self.agent.kube.delete(self.path, grace_seconds=0, uid=self.uid)
        except ApiError as err:
            if err.status != 409:  # 409: a newer pod of the same name (precondition failed)
                raise

    def _kill_all(self, grace: float) -> None:
        running = [c for c in self.init + self.containers if c.proc and c.proc.poll() is None]
        for container in running:
            assert container.proc is not None
            container.proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.proc and c.proc.poll() is None for c in running) and time.monotonic() < deadline:
            time.sleep(TICK)
        for container in running:
            self._record_exit(container)
        for container in self.init + self.containers:
            container.restart_at = None
            if "terminated" in container.state:
                continue
            if "terminated" in container.last_state:  # waiting to restart: its last run is its final state
                container.state = container.last_state
            else:  # never started
                container.state = {
                    "terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now()}
                }

    # -- readiness ------------------------------------------------------------------------------------------

    def _probe(self, container: Container) -> None:
        probe = container.spec.get("readinessProbe")
        if not probe:
            return
        container.next_probe = time.monotonic() + min(1.0, float(probe.get("periodSeconds", 10)))
        ok = self._probe_once(container, probe)
        container.probe_results = (container.probe_results + [ok])[-10:]
        needed = int(probe.get("successThreshold", 1)) if ok else int(probe.get("failureThreshold", 3))
        recent = container.probe_results[-needed:]
        if len(recent) == needed and all(r == ok for r in recent):
            container.ready = ok

    def _probe_once(self, container: Container, probe: Obj) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe or "tcpSocket" in probe:
            action = probe.get("httpGet") or probe["tcpSocket"]
            port = self._port(container, action["port"])
            host = action.get("host") or self.ip
            try:
                if "tcpSocket" in probe:
                    socket.create_connection((host, port), timeout=timeout).close()
                    return True
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
                headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
                conn.request("GET", action.get("path", "/"), headers=headers)
                status = conn.getresponse().status
                conn.close()
                return 200 <= status < 400
            except OSError:
                return False
        if "exec" in probe:
            _, env, cwd = self._launches[container.name]
            argv = podenv.resolve_command(list(probe["exec"]["command"]))
            try:
                return subprocess.run(argv, env=env, cwd=cwd, timeout=timeout, capture_output=True).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        return True  # grpc probes are not simulated

    @staticmethod
    def _port(container: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in container.spec.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"container {container.name} has no port named {port!r}")

    # -- status ---------------------------------------------------------------------------------------------

    def conditions_set(self, kind: str, value: bool) -> None:
        status = "True" if value else "False"
        if self.conditions.get(kind, {}).get("status") != status:
            self.conditions[kind] = {"type": kind, "status": status, "lastTransitionTime": now()}

    def _publish(self, reason: str | None = None) -> None:
        """Patch pods/status if anything changed since the last patch."""
        if self.gone or self.shutdown:
            return
        ready = self.phase == "Running" and all(c.ready for c in self.containers)
        self.conditions_set("ContainersReady", ready)
        self.conditions_set("Ready", ready)
        status: Obj = {
            "phase": self.phase,
            "hostIP": self.agent.host_ip,
            "hostIPs": [{"ip": self.agent.host_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.started,
            "conditions": list(self.conditions.values()),
            "containerStatuses": [c.status("kiln-node-agent") for c in self.containers],
        }
        if self.init:
            status["initContainerStatuses"] = [c.status("kiln-node-agent") for c in self.init]
        if reason:
            status["reason"] = reason
        if status == self._published:
            return
        try:
            self.agent.kube.patch(f"{self.path}/status", {"status": status}, content_type=STRATEGIC)
            self._published = status
        except ApiError as err:
            if err.status != 404:
                raise
            self.gone = True
            self.deleting.set()
