"""kiln's HTTP/2 server (its gRPC port) against h2spec, the HTTP/2 conformance suite: the MUSTs of RFC 9113 and
HPACK it checks, each run as a client against a real server."""

import re
import subprocess
from pathlib import Path
from xml.etree import ElementTree

from serving_support import classifier, config, serving
from tool_support import find_tool, needs

from kiln_cluster.controlplane import free_port

# Both come from the 1 MiB SETTINGS_MAX_FRAME_SIZE kiln advertises (large messages in fewer frames), which h2spec
# takes as the size to send but not as the limit to test: it sends a 1 MiB DATA frame into a stream's 64 KiB window
# (kiln answers FLOW_CONTROL_ERROR, as RFC 9113 §6.9.1 lets it), and a HEADERS frame of 17,576 bytes, within
# kiln's limit, expecting FRAME_SIZE_ERROR as if the limit were 16,384.
ITS_ASSUMPTIONS = {
    ("http2/4.2", "Sends a DATA frame with 2^14 octets in length"),
    ("http2/4.2", "Sends a large size HEADERS frame that exceeds the SETTINGS_MAX_FRAME_SIZE"),
}
# Frame bytes a failure's message may quote (a PING's NULs), which XML cannot hold.
_NOT_XML = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@needs("h2spec")
def test_h2spec_finds_no_violation_but_the_two_its_frame_size_assumptions_make(tmp_path: Path) -> None:
    model = classifier(tmp_path / "m" / "model.onnx")
    report = tmp_path / "h2spec.xml"
    with serving(config(model.parent, grpc_port=free_port())) as server:
        # -o: how long h2spec waits for each frame it expects, far past any answer's time on a loaded machine.
        where = ["-h", "127.0.0.1", "-p", str(server.grpc_port), "-o", "10", "-j", str(report)]
        run = subprocess.run([str(find_tool("h2spec")), *where], capture_output=True, text=True, timeout=600)
    cases = list(ElementTree.fromstring(_NOT_XML.sub(b"?", report.read_bytes())).iter("testcase"))
    failed = {(c.get("package"), c.get("classname")) for c in cases if c.find("error") is not None}
    assert failed == ITS_ASSUMPTIONS, run.stdout[-3000:]
    assert len(cases) == 145  # every test of h2spec 2.2.1 ran
