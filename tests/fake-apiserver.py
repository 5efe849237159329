#!/usr/bin/env python3
"""Test double of the Kubernetes API server for the mesh's end-to-end test.

The test has no cluster, so the controller's kube-rs client talks to this instead, over
plain HTTP/1.1 (kubeconfig `server: http://127.0.0.1:PORT`). Standard library only.
What it serves, with real wire formats (Status errors, chunked watch streams):

- Core kinds under /api/v1, others under /apis/GROUP/VERSION, namespaced and cluster-wide:
  the kinds in RESOURCES, plus any other kind found in --objects (plural guessed).
  gateway.networking.k8s.io is not installed; it and unknown paths answer 404 Status.
- GET lists (limit/continue, labelSelector, fieldSelector) and single objects.
- Watch: replays the logged events after `resourceVersion` (ADDED of the current state
  for "" / "0" / sendInitialEvents=true, the latter closed by the initial-events-end
  BOOKMARK), then live events, a BOOKMARK every 10 s if allowWatchBookmarks=true, and a
  clean end after timeoutSeconds (at most 60).
- POST, PUT (409 Conflict on a stale metadata.resourceVersion), PATCH (merge, strategic
  treated as merge, others 415), DELETE (immediate), /status (writes only status).
  As on a real server, main-resource writes keep the status of kinds with a status
  subresource, writes that change nothing keep the resourceVersion, and generation
  goes up when anything outside metadata and status changes. No dryRun, no generateName.
- POST /apis/authentication.k8s.io/v1/tokenreviews from --tokens (re-read every time):
  {"<token>": <TokenReview status, or a whole TokenReview>}. /version says v1.35.0.
- GET .../pods/NAME/portforward?ports=PORT upgraded to a WebSocket (v4.channel.k8s.io,
  the binary port-forward protocol, one port). It connects to the pod's status.podIP; a
  kubelet connects to 127.0.0.1 inside the pod's network namespace instead, so a
  server bound to its pod IP only would pass here and fail on a cluster.

Usage: fake-apiserver.py --listen 127.0.0.1:PORT --objects DIR --tokens FILE --state FILE --ready FILE
DIR: *.json, each one object or a List. After every write request the state file is
rewritten atomically: {"resourceVersion": N, "objects": {"<apiVersion>/<Kind>/<ns>/<name>": obj}
(ns empty if cluster-scoped), "writes": [{"verb", "path", "query", "contentType", "code"}]}.
The ready file gets the port (PORT may be 0) once listening. One stderr line per request.
"""
import argparse, base64, copy, glob, hashlib, json, os, re, signal, socket, struct, sys, threading, time, traceback, uuid
from bisect import bisect_right
from collections import namedtuple
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

class Res(namedtuple("Res", "group version kind plural namespaced status generation")):
    api_version = property(lambda r: f"{r.group}/{r.version}" if r.group else r.version)
    qualified = property(lambda r: f"{r.plural}.{r.group}" if r.group else r.plural)  # for messages

    def details(self, name):
        return {"name": name, **({"group": self.group} if self.group else {}), "kind": self.plural}

RESOURCES = [Res(*r) for r in [
    # group, version, kind, plural, namespaced, has /status, tracks metadata.generation
    ("", "v1", "Namespace", "namespaces", False, True, False),
    ("", "v1", "Pod", "pods", True, True, True),
    ("", "v1", "Service", "services", True, True, False),
    ("", "v1", "ConfigMap", "configmaps", True, False, False),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True, False, True),
    ("coordination.k8s.io", "v1", "Lease", "leases", True, False, False),
    ("events.k8s.io", "v1", "Event", "events", True, False, False),
    ("security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies", True, True, True),
    ("security.istio.io", "v1", "PeerAuthentication", "peerauthentications", True, True, True),
    ("security.istio.io", "v1", "RequestAuthentication", "requestauthentications", True, True, True),
    ("networking.istio.io", "v1", "VirtualService", "virtualservices", True, True, True),
    ("networking.istio.io", "v1", "DestinationRule", "destinationrules", True, True, True),
    ("networking.istio.io", "v1", "ServiceEntry", "serviceentries", True, True, True),
    ("networking.istio.io", "v1", "WorkloadEntry", "workloadentries", True, True, True),
    ("telemetry.istio.io", "v1", "Telemetry", "telemetries", True, True, True),
]]
NAMESPACES = RESOURCES[0]
NOT_INSTALLED = {"gateway.networking.k8s.io"}
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
PORTFORWARD = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward/?")
WS_GUID, WS_PROTOCOL = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", "v4.channel.k8s.io"
DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
BOOKMARK_EVERY, MAX_WATCH = 10.0, 60
VERSION = {"major": "1", "minor": "35", "emulationMajor": "1", "emulationMinor": "35", "minCompatibilityMajor": "1",
           "minCompatibilityMinor": "34", "gitVersion": "v1.35.0", "gitCommit": "0" * 40, "gitTreeState": "clean",
           "buildDate": "2025-12-17T00:00:00Z", "goVersion": "go1.25.5", "compiler": "gc", "platform": "linux/amd64"}

COND = threading.Condition()  # guards all the state below; notified on every change
RV = 0
STORE = {}  # (Res, namespace or "", name) -> object. Stored objects are never mutated.
LOG = []  # watch events (rv, type, Res, namespace, object), rv increasing
WRITES = []
STOPPING = False
ARGS = None

class ApiError(Exception):
    """An error answer: its code and the Status object a real API server sends."""
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code, self.status = code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                        "message": message, "reason": reason, "details": details or {}, "code": code}

def bad(message):
    return ApiError(400, "BadRequest", message)

def no_resource():
    return ApiError(404, "NotFound", "the server could not find the requested resource")

def not_allowed():
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

def resource_for(apiversion, kind, namespaced):
    group, _, version = apiversion.rpartition("/")
    for res in RESOURCES:
        if (res.group, res.version, res.kind) == (group, version, kind):
            return res
    low = kind.lower()
    plural = low[:-1] + "ies" if re.search("[^aeiou]y$", low) else low + ("es" if re.search("(s|x|ch|sh)$", low) else "s")
    RESOURCES.append(Res(group, version, kind, plural, namespaced, True, bool(group)))
    return RESOURCES[-1]

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: null removes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result

def field(obj, path):
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj).lower() if isinstance(obj, bool) else str(obj)

def matches(obj, labels, fields):
    """labelSelector (=, ==, !=, in, notin, key, !key) and fieldSelector (=, ==, !=)."""
    have = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in re.split(r",(?![^()]*\))", labels or ""))):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", term):
            ok = (have.get(m[1]) in [v.strip() for v in m[3].split(",")]) == (m[2] == "in")
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", term):
            ok = (have.get(m[1]) == m[3]) == (m[2] != "!=")
        else:
            ok = (term.lstrip("!").strip() in have) != term.startswith("!")
        if not ok:
            return False
    for term in filter(None, (t.strip() for t in (fields or "").split(","))):
        if not (m := re.fullmatch(r"([^!=]+)(==|=|!=)(.*)", term)):
            raise bad(f"invalid field selector: {term}")
        if (field(obj, m[1]) == m[3]) == (m[2] == "!="):
            return False
    return True

def commit(res, ns, name, obj, etype):
    """Stores (or removes) obj under a new resourceVersion and logs its watch event."""
    global RV
    RV += 1
    obj["metadata"]["resourceVersion"] = str(RV)
    if etype == "DELETED":
        del STORE[(res, ns, name)]
    else:
        STORE[(res, ns, name)] = obj
    LOG.append((RV, etype, res, ns, obj))
    COND.notify_all()
    return obj

def load(directory):
    """Loads the objects, keeping their resourceVersions where those keep increasing."""
    global RV
    objects = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        objects += doc["items"] if str(doc.get("kind")).endswith("List") and "items" in doc else [doc]
    recorded_rv = lambda o: int(rv) if str(rv := o.get("metadata", {}).get("resourceVersion", "")).isdigit() else 0
    for obj in sorted(objects, key=recorded_rv):
        meta = obj.setdefault("metadata", {})
        if not (obj.get("apiVersion") and obj.get("kind") and meta.get("name")) \
                or obj["apiVersion"].split("/")[0] in NOT_INSTALLED:
            print(f"fake-apiserver: not loading {obj.get('kind')} {meta.get('name')}", file=sys.stderr)
            continue
        res = resource_for(obj["apiVersion"], obj["kind"], "namespace" in meta)
        RV = max(recorded_rv(obj), RV + 1)
        meta.update(resourceVersion=str(RV), uid=meta.get("uid") or str(uuid.uuid4()),
                    creationTimestamp=meta.get("creationTimestamp") or now())
        if res.generation:
            meta.setdefault("generation", 1)
        ns = meta.setdefault("namespace", "default") if res.namespaced else ""
        LOG.append((RV, "MODIFIED" if (res, ns, meta["name"]) in STORE else "ADDED", res, ns, obj))
        STORE[(res, ns, meta["name"])] = obj

def save_state():
    objects = {f"{o['apiVersion']}/{o['kind']}/{ns}/{name}": o for (_, ns, name), o in STORE.items()}
    with open(ARGS.state + ".tmp", "w") as f:
        json.dump({"resourceVersion": RV, "objects": dict(sorted(objects.items())), "writes": WRITES}, f, indent=1)
    os.replace(ARGS.state + ".tmp", ARGS.state)

def token_review(body):
    spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
    wanted = spec.get("audiences") or [DEFAULT_AUDIENCE]
    try:
        with open(ARGS.tokens) as f:
            known = json.load(f).get(spec.get("token", ""))
    except FileNotFoundError:
        known = None
    if known is None:
        status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
    else:
        status = copy.deepcopy(known.get("status", {}) if known.get("kind") == "TokenReview" else known)
        have = status.get("audiences") or [DEFAULT_AUDIENCE]
        common = [a for a in wanted if a in have]
        go_q = lambda xs: "[" + " ".join(json.dumps(x) for x in xs) + "]"  # Go's %q of a []string
        if status.get("authenticated") and not common:
            status = {"user": {}, "error": f"[invalid bearer token, token audiences {go_q(have)} "
                                           f"is invalid for the target audiences {go_q(wanted)}]"}
        elif status.get("authenticated"):
            status["audiences"] = common
    return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {},
            "spec": spec, "status": status}

def resolve(parts):
    """(Res, namespace, name or None, subresource or None) of a resource path."""
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) > 3 and parts[1] not in NOT_INSTALLED:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise no_resource()
    by_plural = {r.plural: r for r in RESOURCES if (r.group, r.version) == (group, version)}
    ns = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and getattr(by_plural.get(rest[2]), "namespaced", False):
        ns, rest = rest[1], rest[2:]
    res = by_plural.get(rest[0]) if rest else None
    if res is None or len(rest) > 3 or (res.namespaced and not ns and len(rest) > 1) \
            or (len(rest) == 3 and not (rest[2] == "status" and res.status)):
        raise no_resource()
    return res, ns, (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)

def get(res, ns, name):
    if (obj := STORE.get((res, ns, name))) is None:
        raise ApiError(404, "NotFound", f'{res.qualified} "{name}" not found', res.details(name))
    return obj

def list_objects(res, ns, q):
    items = sorted(((k[1], k[2]), o) for k, o in STORE.items() if k[0] == res and ns in ("", k[1]))
    items = [(k, o) for k, o in items if matches(o, q.get("labelSelector"), q.get("fieldSelector"))]
    meta, limit = {"resourceVersion": str(RV)}, int(q.get("limit") or 0)
    if q.get("continue"):
        try:
            token = json.loads(base64.urlsafe_b64decode(q["continue"]))
            meta["resourceVersion"], items = token["rv"], [(k, o) for k, o in items if list(k) > token["after"]]
        except (ValueError, KeyError, TypeError):
            raise bad("continue key is not valid")
    if 0 < limit < len(items):
        token = {"rv": meta["resourceVersion"], "after": list(items[limit - 1][0])}
        meta.update(remainingItemCount=len(items) - limit, **{"continue": base64.urlsafe_b64encode(
            json.dumps(token).encode()).decode()})
        items = items[:limit]
    return {"apiVersion": res.api_version, "kind": res.kind + "List", "metadata": meta, "items": [o for _, o in items]}

def check_body(res, ns, name, obj):
    if not isinstance(obj, dict) or not isinstance(obj.setdefault("metadata", {}), dict):
        raise bad("the body of the request must be a JSON object with object metadata")
    meta = obj["metadata"]
    if obj.setdefault("apiVersion", res.api_version) != res.api_version or obj.setdefault("kind", res.kind) != res.kind:
        raise bad(f"the API version in the data ({obj['apiVersion']}) or kind ({obj['kind']}) "
                  f"does not match the expected {res.api_version}, {res.kind}")
    if name and meta.setdefault("name", name) != name:
        raise bad(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
    if res.namespaced and meta.setdefault("namespace", ns) != ns:
        raise bad("the namespace of the provided object does not match the namespace sent on the request")
    return meta

def create(res, ns, obj):
    meta = check_body(res, ns, None, obj)
    if meta.get("resourceVersion"):
        raise bad("resourceVersion should not be set on objects to be created")
    if not meta.get("name"):  # (generateName is not supported)
        raise ApiError(422, "Invalid", f'{res.kind} "" is invalid: metadata.name: Required value: name is required')
    if res.namespaced and (NAMESPACES, "", ns) not in STORE:
        raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', NAMESPACES.details(ns))
    if (res, ns, meta["name"]) in STORE:
        raise ApiError(409, "AlreadyExists", f'{res.qualified} "{meta["name"]}" already exists', res.details(meta["name"]))
    meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), **({"generation": 1} if res.generation else {}))
    if res.status:  # the status subresource's: a create does not set it
        obj.pop("status", None)
    if res == NAMESPACES:  # what the API server and the namespace lifecycle add
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj["status"] = {"phase": "Active"}
    return commit(res, ns, meta["name"], obj, "ADDED")

def update(res, ns, name, body, sub):
    """PUT and PATCH: optimistic concurrency, immutable fields, status rules, no-op writes."""
    old = get(res, ns, name)
    meta = check_body(res, ns, name, body)
    if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
        raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": the object '
                       "has been modified; please apply your changes to the latest version and try again",
                       res.details(name))
    if sub == "status":  # only the status of the body counts
        new = {k: v for k, v in copy.deepcopy(old).items() if k != "status"}
        if body.get("status") is not None:
            new["status"] = body["status"]
    else:
        new = body
        for key in ("uid", "creationTimestamp", "generation"):
            meta.pop(key, None)
            if key in old["metadata"]:
                meta[key] = old["metadata"][key]
        if res.status:  # the main resource does not write the status subresource
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        outside = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}
        if "generation" in meta and outside(new) != outside(old):
            meta["generation"] += 1
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
    return old if new == old else commit(res, ns, name, new, "MODIFIED")

class Handler(BaseHTTPRequestHandler):
    protocol_version = default_request_version = "HTTP/1.1"  # the latter: status lines even on garbage
    server_version = "fake-apiserver"

    def handle(self):
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):  # the client dropped a kept-alive connection
            self.close_connection = True

    def log_request(self, code="-", size="-"):
        print(f"{self.command or '-'} {getattr(self, 'path', '-')} {int(code)}", file=sys.stderr, flush=True)

    def send_error(self, code, message=None, explain=None):  # malformed HTTP, from http.server itself
        self.close_connection = True
        self.reply(code, ApiError(code, "BadRequest", message or explain or "bad request").status)

    def reply(self, code, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url, method = urlsplit(self.path), self.command
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            # None: a patch type this double does not speak (415 once the path is known)
            body = None if method == "PATCH" and ctype not in MERGE_TYPES else json.loads(raw) if raw.strip() else {}
            code, obj = self.route(method, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}, body)
        except ApiError as e:
            code, obj = e.code, e.status
        except ValueError as e:  # the body is not JSON, or a number parameter is not a number
            code, obj = 400, bad(f"cannot decode the request: {e}").status
        except Exception as e:  # a bug here must not take the server down
            traceback.print_exc()
            code, obj = 500, ApiError(500, "InternalError", f"fake-apiserver: {e!r}").status
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            with COND:
                WRITES.append({"verb": method, "path": url.path, "query": url.query, "contentType": ctype, "code": code})
                save_state()
        if code:  # 0: a watch, already answered
            self.reply(code, obj)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def route(self, method, path, q, body):
        if method == "GET" and (m := PORTFORWARD.fullmatch(path)):
            return self.portforward(m[1], m[2], q)
        if path == "/version":
            return 200, VERSION
        if path.rstrip("/") == TOKENREVIEWS:
            if method != "POST":
                raise not_allowed()
            return 201, token_review(body if isinstance(body, dict) else {})
        res, ns, name, sub = resolve([p for p in path.split("/") if p])
        if method == "GET" and q.get("watch") in ("true", "1"):
            return self.watch(res, ns, name, q)
        with COND:
            if method == "GET":
                return 200, (list_objects(res, ns, q) if name is None else get(res, ns, name))
            if method == "POST" and name is None:
                return 201, create(res, ns, body)
            if method == "PUT" and name:
                return 200, update(res, ns, name, body, sub)
            if method == "PATCH" and name:
                if body is None:
                    raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                   f"accepted media types include: {', '.join(MERGE_TYPES)} (in this test double)")
                if not isinstance(body, dict):
                    raise bad("a merge patch must be a JSON object")
                return 200, update(res, ns, name, merge_patch(copy.deepcopy(get(res, ns, name)), body), sub)
            if method == "DELETE" and name and not sub:
                return 200, commit(res, ns, name, copy.deepcopy(get(res, ns, name)), "DELETED")
        raise not_allowed()

    def chunk(self, event):
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def watch(self, res, ns, name, q):
        fields = ",".join(filter(None, [q.get("fieldSelector"), name and f"metadata.name={name}"]))
        wanted = lambda r, n, o: r == res and ns in ("", n) and matches(o, q.get("labelSelector"), fields)
        bookmark = lambda rv, **notes: {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version,
                                        "metadata": {"resourceVersion": str(rv), **({"annotations": notes} if notes else {})}}}
        matches({}, q.get("labelSelector"), fields)  # a bad selector fails before the stream starts
        since, initial = q.get("resourceVersion", ""), []
        if since and not since.isdigit():
            raise bad(f"invalid resource version: {since}")
        timeout = min(int(q.get("timeoutSeconds") or 0) or MAX_WATCH, MAX_WATCH)
        with COND:
            if since in ("", "0") or q.get("sendInitialEvents") == "true":
                initial = [{"type": "ADDED", "object": o} for (r, n, _), o in sorted(
                    STORE.items(), key=lambda kv: kv[0][1:]) if wanted(r, n, o)]
                if q.get("sendInitialEvents") == "true":
                    initial.append(bookmark(RV, **{"k8s.io/initial-events-end": "true"}))
                since = RV
            pos = bisect_right(LOG, int(since), key=lambda e: e[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline, next_bookmark = time.monotonic() + timeout, time.monotonic() + BOOKMARK_EVERY
        try:
            for event in initial:
                self.chunk(event)
            while True:
                with COND:
                    while pos == len(LOG) and not STOPPING and (wait := min(deadline, next_bookmark) - time.monotonic()) > 0:
                        COND.wait(wait)
                    batch, pos, current = LOG[pos:], len(LOG), RV
                for _, etype, r, n, o in batch:
                    if wanted(r, n, o):
                        self.chunk({"type": etype, "object": o})
                if time.monotonic() >= deadline or STOPPING:
                    break
                if time.monotonic() >= next_bookmark:
                    next_bookmark = time.monotonic() + BOOKMARK_EVERY
                    if q.get("allowWatchBookmarks") == "true":
                        self.chunk(bookmark(current))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away
            self.close_connection = True
        return 0, None

    def portforward(self, ns, name, q):
        """Channel 0 carries the port's data both ways, channel 1 the API server's error
        text; each opens with the port number (2 bytes, little endian)."""
        with COND:
            pod = get(RESOURCES[1], ns, name)
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if self.headers.get("Upgrade", "").lower() != "websocket" or WS_PROTOCOL not in offered:
            raise bad(f"port-forward needs a WebSocket upgrade offering {WS_PROTOCOL} (this double has no SPDY)")
        if not q.get("ports", "").isdigit() or not 0 < int(q["ports"]) < 65536:
            raise bad(f"invalid ports parameter {q.get('ports')!r} (this double forwards one port)")
        ip, phase = pod.get("status", {}).get("podIP"), pod.get("status", {}).get("phase")
        if phase != "Running" or not ip:
            raise bad(f"unable to upgrade connection: pod {name} is not running")
        port = int(q["ports"])
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
        self.send_response(101)
        for header, value in (("Upgrade", "websocket"), ("Connection", "Upgrade"),
                              ("Sec-WebSocket-Accept", accept.decode()), ("Sec-WebSocket-Protocol", WS_PROTOCOL)):
            self.send_header(header, value)
        self.end_headers()
        self.close_connection = True
        lock = threading.Lock()

        def send(opcode, payload=b""):
            n = len(payload)
            size = bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n) if n < 65536 else b"\x7f" + struct.pack(">Q", n)
            with lock:
                self.wfile.write(bytes([0x80 | opcode]) + size + payload)
                self.wfile.flush()
        for channel in (0, 1):
            send(2, bytes([channel]) + struct.pack("<H", port))
        try:
            upstream = socket.create_connection((ip, port), timeout=5)
        except OSError as e:
            send(2, b"\x01" + f"error forwarding port {port} to pod {name}: {e}".encode())
            send(8)
            return 0, None
        upstream.settimeout(None)

        def from_pod():
            try:
                while data := upstream.recv(65536):
                    send(2, b"\x00" + data)
                send(8)  # the pod's side is done: close
            except OSError:
                pass
        pump = threading.Thread(target=from_pod, daemon=True)
        pump.start()
        try:
            while True:  # the client's frames are masked
                head = self.rfile.read(2)
                if len(head) < 2:
                    break
                opcode, n = head[0] & 0x0F, head[1] & 0x7F
                n = struct.unpack(">H", self.rfile.read(2))[0] if n == 126 else \
                    struct.unpack(">Q", self.rfile.read(8))[0] if n == 127 else n
                mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
                if opcode == 8:
                    send(8, payload[:2])  # the closing handshake's answer
                    break
                if opcode == 9:
                    send(10, payload)
                elif opcode == 2 and payload[:1] == b"\x00" and len(payload) > 1:
                    upstream.sendall(payload[1:])
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_RDWR)  # ends the pump's recv
            except OSError:
                pass
            pump.join(5)
            upstream.close()
        return 0, None

def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--listen", "--objects", "--tokens", "--state", "--ready"):
        parser.add_argument(flag, required=True)
    ARGS = parser.parse_args()
    host, port = ARGS.listen.rsplit(":", 1)
    load(ARGS.objects)
    ThreadingHTTPServer.request_queue_size = 128  # the controller opens a dozen watches at once
    server = ThreadingHTTPServer((host, int(port)), Handler)  # daemon threads: watches do not hold up exit
    with COND:
        save_state()

    def stop():
        global STOPPING
        with COND:  # end the open watches cleanly
            STOPPING = True
            COND.notify_all()
        server.shutdown()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=stop, daemon=True).start())
    with open(ARGS.ready + ".tmp", "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(ARGS.ready + ".tmp", ARGS.ready)
    print(f"fake-apiserver: listening on {host}:{server.server_address[1]}, {len(STORE)} objects, RV {RV}",
          file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.2)
    server.server_close()

if __name__ == "__main__":
    main()
