#!/usr/bin/env python3
"""Test double of the Kubernetes API server for the mesh's end-to-end test.

There is no cluster in the test environment, so the controller's kube-rs client talks
to this instead, over plain HTTP/1.1 (kubeconfig `server: http://127.0.0.1:PORT`).
Python 3 standard library only. It speaks the real wire protocol for what kube-rs uses:

- Routing: core kinds under /api/v1, others under /apis/GROUP/VERSION, namespaced
  (.../namespaces/NS/PLURAL[/NAME[/status]]) and cluster-wide. Kinds in RESOURCES, plus
  any other kind found in --objects (plural guessed). gateway.networking.k8s.io is not
  installed; it and every unknown path answer 404 with a `Status`, like a real server.
- GET list (`<Kind>List`, limit/continue paging, labelSelector, fieldSelector on any
  dotted field) and GET by name.
- Watch (`?watch=true`): the events after `resourceVersion` from an unbounded in-memory
  log (synthetic ADDED of the current state when it is "" or "0", or with
  `sendInitialEvents=true`, which then ends with the `k8s.io/initial-events-end`
  BOOKMARK), then live events; a BOOKMARK every 10 s with `allowWatchBookmarks=true`;
  the stream ends cleanly after `timeoutSeconds` (at most 60).
- POST (create, 409 AlreadyExists, 404 for a missing namespace), PUT (409 Conflict on a
  stale metadata.resourceVersion), PATCH (merge-patch; strategic merge is treated as
  merge; apply-patch and json-patch answer 415), DELETE (immediate: no finalizers), and
  `/status`, which changes only `status`. As on a real server, writes to the main
  resource keep the old status of kinds with a status subresource, writes that change
  nothing change no resourceVersion, `dryRun=All` stores nothing, and
  metadata.generation goes up when anything outside metadata and status changes.
- POST /apis/authentication.k8s.io/v1/tokenreviews answered from --tokens (re-read at
  every review): `{"<token>": <TokenReview status, or a whole TokenReview>}`.
- /version (v1.35.0), /api, /apis, /api/v1, /apis/G/V discovery, /healthz.

Usage: fake-apiserver.py --listen 127.0.0.1:PORT --objects DIR --tokens FILE
                         --state FILE --ready FILE
DIR holds *.json files, each one object or a List. After every write request the state
file is rewritten atomically: {"resourceVersion": N, "objects":
{"<apiVersion>/<Kind>/<ns>/<name>": obj} (ns empty when cluster-scoped), "writes":
[{"verb", "path", "query", "contentType", "code"}]}. The ready file receives the port
(PORT may be 0) once the server listens. One line per request on stderr. SIGTERM ends it.
"""
import argparse, base64, copy, glob, json, os, random, re, signal, sys, threading, time, traceback, uuid
from bisect import bisect_right
from collections import namedtuple
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

Res = namedtuple("Res", "group version kind plural namespaced status generation")
RESOURCES = [Res(*r) for r in [
    # group, version, kind, plural, namespaced, has /status, tracks metadata.generation
    ("", "v1", "Namespace", "namespaces", False, True, False),
    ("", "v1", "Node", "nodes", False, True, False),
    ("", "v1", "Pod", "pods", True, True, True),
    ("", "v1", "Service", "services", True, True, False),
    ("", "v1", "ServiceAccount", "serviceaccounts", True, False, False),
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
NOT_INSTALLED = {"gateway.networking.k8s.io"}
TOKEN_GV = ("authentication.k8s.io", "v1")
DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
BOOKMARK_EVERY, MAX_WATCH = 10.0, 60
VERSION = {"major": "1", "minor": "35", "emulationMajor": "1", "emulationMinor": "35",
           "minCompatibilityMajor": "1", "minCompatibilityMinor": "34", "gitVersion": "v1.35.0",
           "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
           "buildDate": "2025-12-17T00:00:00Z", "goVersion": "go1.25.5", "compiler": "gc",
           "platform": "linux/amd64"}

COND = threading.Condition()  # guards everything below; notified on every change
RV = 0
STORE = {}  # (Res, namespace or "", name) -> object; stored objects are never mutated
LOG = []  # (rv, type, Res, namespace, object), rv increasing
WRITES = []
STOPPING = False
ARGS = None


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self):
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


def no_resource():
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def bad(message):
    return ApiError(400, "BadRequest", message)


def qualified(res):
    return f"{res.plural}.{res.group}" if res.group else res.plural


def details(res, name):
    return {"name": name, **({"group": res.group} if res.group else {}), "kind": res.plural}


def not_found(res, name):
    return ApiError(404, "NotFound", f'{qualified(res)} "{name}" not found', details(res, name))


def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_version(res):
    return f"{res.group}/{res.version}" if res.group else res.version


def resource_for(apiversion, kind, namespaced=True):
    group, _, version = apiversion.rpartition("/")
    for res in RESOURCES:
        if (res.group, res.version, res.kind) == (group, version, kind):
            return res
    low = kind.lower()
    plural = low[:-1] + "ies" if re.search("[^aeiou]y$", low) else low + ("es" if re.search("(s|x|ch|sh)$", low) else "s")
    res = Res(group, version, kind, plural, namespaced, True, bool(group))
    RESOURCES.append(res)
    return res


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (null deletes a key)."""
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
    """labelSelector (=, ==, !=, in, notin, exists, !exists) and fieldSelector (=, ==, !=)."""
    have = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in re.split(r",(?![^()]*\))", labels or ""))):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", term):
            inside = have.get(m[1]) in [v.strip() for v in m[3].split(",")]
            ok = inside if m[2] == "in" else not inside
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", term):
            ok = (have.get(m[1]) == m[3]) == (m[2] != "!=")
        else:
            ok = (term.lstrip("!").strip() in have) != term.startswith("!")
        if not ok:
            return False
    for term in filter(None, (t.strip() for t in (fields or "").split(","))):
        m = re.fullmatch(r"([^!=]+)(==|=|!=)(.*)", term)
        if not m:
            raise bad(f"invalid field selector: {term}")
        if (field(obj, m[1]) == m[3]) == (m[2] == "!="):
            return False
    return True


def commit(res, ns, name, obj, etype, dry=False):
    """Stores (or removes) obj under a new resourceVersion and logs the watch event."""
    global RV
    if dry:
        return obj
    RV += 1
    obj.setdefault("metadata", {})["resourceVersion"] = str(RV)
    if etype == "DELETED":
        STORE.pop((res, ns, name), None)
    else:
        STORE[(res, ns, name)] = obj
    LOG.append((RV, etype, res, ns, obj))
    COND.notify_all()
    return obj


def load(directory):
    global RV
    objects = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        is_list = str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list)
        objects += doc["items"] if is_list else [doc]
    rv_of = lambda o: int(o.get("metadata", {}).get("resourceVersion") or 0) if str(
        o.get("metadata", {}).get("resourceVersion", "")).isdigit() else 0
    for obj in sorted(objects, key=rv_of):  # keep recorded resourceVersions while increasing
        meta = obj.setdefault("metadata", {})
        if not (obj.get("apiVersion") and obj.get("kind") and meta.get("name")) \
                or obj["apiVersion"].split("/")[0] in NOT_INSTALLED:
            print(f"fake-apiserver: not loading {obj.get('kind')} {meta.get('name')}", file=sys.stderr)
            continue
        res = resource_for(obj["apiVersion"], obj["kind"], "namespace" in meta)
        RV = max(rv_of(obj), RV + 1)
        meta["resourceVersion"] = str(RV)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        if res.generation:
            meta.setdefault("generation", 1)
        ns = meta.setdefault("namespace", "default") if res.namespaced else ""
        key = (res, ns, meta["name"])
        LOG.append((RV, "MODIFIED" if key in STORE else "ADDED", res, ns, obj))
        STORE[key] = obj


def save_state():
    objects = {f"{o['apiVersion']}/{o['kind']}/{ns}/{name}": o for (_, ns, name), o in sorted(
        STORE.items(), key=lambda kv: (kv[0][0].group, kv[0][0].kind, kv[0][1], kv[0][2]))}
    tmp = ARGS.state + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"resourceVersion": RV, "objects": objects, "writes": WRITES}, f, indent=1)
    os.replace(tmp, ARGS.state)


def token_review(body):
    spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
    wanted = spec.get("audiences") or [DEFAULT_AUDIENCE]
    try:
        with open(ARGS.tokens) as f:
            tokens = json.load(f)
    except FileNotFoundError:
        tokens = {}
    known = tokens.get(spec.get("token", ""))
    if known is None:
        status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
    else:
        status = copy.deepcopy(known.get("status", {}) if known.get("kind") == "TokenReview" else known)
        have = status.get("audiences") or [DEFAULT_AUDIENCE]
        common = [a for a in wanted if a in have]
        goq = lambda xs: "[" + " ".join(json.dumps(x) for x in xs) + "]"  # Go's %q of a []string
        if status.get("authenticated") and not common:
            status = {"user": {}, "error": f"[invalid bearer token, token audiences {goq(have)} "
                                           f"is invalid for the target audiences {goq(wanted)}]"}
        elif status.get("authenticated"):
            status["audiences"] = common
    return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {},
            "spec": spec, "status": status}


def discovery(parts):
    groups = {}
    for res in RESOURCES:
        groups.setdefault(res.group, set()).add(res.version)
    groups.setdefault(TOKEN_GV[0], set()).add(TOKEN_GV[1])
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs":
                [{"clientCIDR": "0.0.0.0/0", "serverAddress": ARGS.listen}]}
    if parts == ["apis"]:
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in sorted(vs)],
             "preferredVersion": {"groupVersion": f"{g}/{max(vs)}", "version": max(vs)}}
            for g, vs in sorted(groups.items()) if g]}
    group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
    if version not in groups.get(group, ()):
        raise no_resource()
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    listed = [{"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
               "kind": r.kind, "verbs": verbs} for r in RESOURCES if (r.group, r.version) == (group, version)]
    listed += [{"name": r["name"] + "/status", "singularName": "", "namespaced": r["namespaced"],
                "kind": r["kind"], "verbs": ["get", "patch", "update"]}
               for r, res in zip(list(listed), [r for r in RESOURCES if (r.group, r.version) == (group, version)])
               if res.status]
    if (group, version) == TOKEN_GV:
        listed.append({"name": "tokenreviews", "singularName": "tokenreview", "namespaced": False,
                       "kind": "TokenReview", "verbs": ["create"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": listed}


def resolve(group, version, rest):
    """(Res, namespace, name or None, subresource or None) for a resource path."""
    by_plural = {r.plural: r for r in RESOURCES if (r.group, r.version) == (group, version)}
    ns = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural and by_plural[rest[2]].namespaced:
        ns, rest = rest[1], rest[2:]
    res = by_plural.get(rest[0])
    if res is None or len(rest) > 3 or (res.namespaced and ns == "" and len(rest) > 1) \
            or (len(rest) == 3 and not (rest[2] == "status" and res.status)):
        raise no_resource()
    return res, ns, (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)


def get(res, ns, name):
    obj = STORE.get((res, ns, name))
    if obj is None:
        raise not_found(res, name)
    return obj


def list_objects(res, ns, q):
    items = sorted(((k[1], k[2]), o) for k, o in STORE.items() if k[0] == res and ns in ("", k[1]))
    items = [(k, o) for k, o in items if matches(o, q.get("labelSelector"), q.get("fieldSelector"))]
    meta, rv = {}, str(RV)
    if q.get("continue"):
        try:
            token = json.loads(base64.urlsafe_b64decode(q["continue"]))
            rv, items = token["rv"], [(k, o) for k, o in items if list(k) > token["after"]]
        except (ValueError, KeyError, TypeError):
            raise bad("continue key is not valid")
    limit = int(q.get("limit") or 0)
    if 0 < limit < len(items):
        meta["continue"] = base64.urlsafe_b64encode(json.dumps({"rv": rv, "after": list(items[limit - 1][0])}).encode()).decode()
        meta["remainingItemCount"] = len(items) - limit
        items = items[:limit]
    return {"apiVersion": api_version(res), "kind": res.kind + "List",
            "metadata": {"resourceVersion": rv, **meta}, "items": [o for _, o in items]}


def check_body(res, ns, name, obj):
    if not isinstance(obj, dict) or not isinstance(obj.setdefault("metadata", {}), dict):
        raise bad("the body of the request must be a JSON object with object metadata")
    meta = obj["metadata"]
    if obj.get("apiVersion", api_version(res)) != api_version(res) or obj.get("kind", res.kind) != res.kind:
        raise bad(f"the API version in the data ({obj.get('apiVersion')}) or kind ({obj.get('kind')}) "
                  f"does not match the expected {api_version(res)}, {res.kind}")
    if name and meta.setdefault("name", name) != name:
        raise bad(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
    if res.namespaced and meta.setdefault("namespace", ns) != ns:
        raise bad("the namespace of the provided object does not match the namespace sent on the request")
    obj["apiVersion"], obj["kind"] = api_version(res), res.kind
    return meta


def create(res, ns, obj, dry):
    meta = check_body(res, ns, None, obj)
    if meta.get("resourceVersion"):
        raise bad("resourceVersion should not be set on objects to be created")
    if not meta.get("name"):
        if not meta.get("generateName"):
            raise ApiError(422, "Invalid", f"{res.kind} \"\" is invalid: metadata.name: Required value: "
                                           "name or generateName is required")
        meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
    if res.namespaced and (RESOURCES[0], "", ns) not in STORE:
        raise not_found(RESOURCES[0], ns)
    if (res, ns, meta["name"]) in STORE:
        raise ApiError(409, "AlreadyExists", f'{qualified(res)} "{meta["name"]}" already exists',
                       details(res, meta["name"]))
    meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
    if res.generation:
        meta["generation"] = 1
    return commit(res, ns, meta["name"], obj, "ADDED", dry)


def update(res, ns, name, body, sub, dry):
    """PUT and PATCH: optimistic concurrency, immutable fields, status rules, no-op writes."""
    old = get(res, ns, name)
    meta = check_body(res, ns, name, body)
    if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
        raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {qualified(res)} "{name}": the object '
                       "has been modified; please apply your changes to the latest version and try again",
                       details(res, name))
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
    return old if new == old else commit(res, ns, name, new, "MODIFIED", dry)


def delete(res, ns, name, body, dry):
    old = get(res, ns, name)
    pre = body.get("preconditions") or {} if isinstance(body, dict) else {}
    if pre.get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]) or \
            pre.get("uid") not in (None, old["metadata"].get("uid")):
        raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {qualified(res)} "{name}": '
                       "the precondition does not match", details(res, name))
    return commit(res, ns, name, copy.deepcopy(old), "DELETED", dry)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-apiserver"

    def log_request(self, code="-", size="-"):
        print(f"{self.command} {getattr(self, 'path', '')} {int(code)}", file=sys.stderr, flush=True)

    def log_message(self, fmt, *args):
        print("fake-apiserver: " + fmt % args, file=sys.stderr, flush=True)

    def send_error(self, code, message=None, explain=None):  # malformed HTTP, from http.server itself
        self.close_connection = True
        self.reply(code, ApiError(code, "BadRequest", message or explain or "bad request").status())

    def reply(self, code, obj):
        data = (json.dumps(obj) + "\n").encode() if not isinstance(obj, bytes) else obj
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(obj, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        url = urlsplit(self.path)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        writing = self.command in ("POST", "PUT", "PATCH", "DELETE")
        try:
            raw = self.read_body()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError as e:
                raise bad(f"the body of the request cannot be decoded as JSON: {e}")
            code, obj = self.route(self.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()},
                                   ctype, body)
        except ApiError as e:
            code, obj = e.code, e.status()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as e:  # never let a request take the server down
            traceback.print_exc()
            code, obj = 500, ApiError(500, "InternalError", f"fake-apiserver: {e!r}").status()
        if writing:
            with COND:
                WRITES.append({"verb": self.command, "path": url.path, "query": url.query,
                               "contentType": ctype, "code": code})
                save_state()
        if code:  # 0: a watch that already answered
            self.reply(code, obj)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def route(self, method, path, q, ctype, body):
        parts = [p for p in path.split("/") if p]
        if path in ("/healthz", "/livez", "/readyz"):
            return 200, b"ok"
        if path == "/version":
            return 200, VERSION
        if parts in (["api"], ["apis"]) or parts[:1] == ["api"] and len(parts) == 2 \
                or parts[:1] == ["apis"] and len(parts) == 3:
            return 200, discovery(parts)
        if parts[:1] == ["api"] and parts[1:2] == ["v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) > 3 and parts[1] not in NOT_INSTALLED:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise no_resource()
        if (group, version) == TOKEN_GV and rest == ["tokenreviews"]:
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            return 201, token_review(body if isinstance(body, dict) else {})
        res, ns, name, sub = resolve(group, version, rest)
        dry = q.get("dryRun") == "All"
        if method == "GET" and q.get("watch") in ("true", "1"):
            return self.watch(res, ns, name, q)
        with COND:
            if method == "GET":
                return 200, (list_objects(res, ns, q) if name is None else get(res, ns, name))
            if method == "POST" and name is None:
                return 201, create(res, ns, body, dry)
            if method == "PUT" and name:
                return 200, update(res, ns, name, body, sub, dry)
            if method == "PATCH" and name:
                if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                   "accepted media types include: application/merge-patch+json, "
                                   "application/strategic-merge-patch+json (this test double)")
                if not isinstance(body, dict):
                    raise bad("a merge patch must be a JSON object")
                return 200, update(res, ns, name, merge_patch(copy.deepcopy(get(res, ns, name)), body), sub, dry)
            if method == "DELETE" and name and not sub:
                return 200, delete(res, ns, name, body, dry)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def chunk(self, event):
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def watch(self, res, ns, name, q):
        fields = ",".join(filter(None, [q.get("fieldSelector"), name and f"metadata.name={name}"]))
        wanted = lambda r, n, o: r == res and ns in ("", n) and matches(o, q.get("labelSelector"), fields)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        bookmark = lambda rv, **ann: {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": api_version(
            res), "metadata": {"resourceVersion": str(rv), **({"annotations": ann} if ann else {})}}}
        since = q.get("resourceVersion", "")
        if not since.isdigit():
            if since:
                raise bad(f"invalid resource version: {since}")
        timeout = min(int(q.get("timeoutSeconds") or MAX_WATCH) or MAX_WATCH, MAX_WATCH)
        with COND:
            initial = []
            if since in ("", "0") or q.get("sendInitialEvents") == "true":
                initial = [{"type": "ADDED", "object": o} for (r, n, _), o in sorted(
                    STORE.items(), key=lambda kv: (kv[0][1], kv[0][2])) if wanted(r, n, o)]
                if q.get("sendInitialEvents") == "true":
                    initial.append(bookmark(RV, **{"k8s.io/initial-events-end": "true"}))
                since = RV
            pos = bisect_right(LOG, int(since), key=lambda e: e[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        start = time.monotonic()
        deadline, next_bookmark = start + timeout, start + BOOKMARK_EVERY
        try:
            for event in initial:
                self.chunk(event)
            while True:
                with COND:
                    while pos == len(LOG) and not STOPPING and (left := min(deadline, next_bookmark) - time.monotonic()) > 0:
                        COND.wait(left)
                    batch, pos, current = LOG[pos:], len(LOG), RV
                for _, etype, r, n, o in batch:
                    if wanted(r, n, o):
                        self.chunk({"type": etype, "object": o})
                t = time.monotonic()
                if t >= deadline or STOPPING:
                    break
                if t >= next_bookmark:
                    next_bookmark = t + BOOKMARK_EVERY
                    if bookmarks:
                        self.chunk(bookmark(current))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away
            self.close_connection = True
        return 0, None


def main():
    global ARGS, STOPPING
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--listen", "--objects", "--tokens", "--state", "--ready"):
        parser.add_argument(flag, required=True)
    ARGS = parser.parse_args()
    host, port = ARGS.listen.rsplit(":", 1)
    load(ARGS.objects)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    ARGS.listen = f"{host}:{server.server_address[1]}"
    with COND:
        save_state()

    def stop(signum, frame):
        global STOPPING
        STOPPING = True
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with open(ARGS.ready + ".tmp", "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(ARGS.ready + ".tmp", ARGS.ready)
    print(f"fake-apiserver: listening on {ARGS.listen}, {len(STORE)} objects, resourceVersion {RV}",
          file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.2)
    with COND:
        COND.notify_all()
    server.server_close()


if __name__ == "__main__":
    main()
