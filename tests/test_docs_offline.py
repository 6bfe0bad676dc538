"/docs and /redoc with no network: Swagger UI and ReDoc from the files installed with the app (06c_api_docs), never a CDN."
import re, shutil, subprocess, sys

import httpx
import pytest
from fastapi.testclient import TestClient

from fraud_mlops.api_docs import ASSETS
from fraud_mlops.data import FEATURES
from fraud_mlops.serving import app

# A sitecustomize that lets the server process connect only to loopback addresses: a CDN, a font or a validator
# reached by the app itself would fail with "network blocked", and so would any name lookup.
NO_NETWORK = '''
import ipaddress, socket
def _local(address):
    host = address[0] if isinstance(address, tuple) else address
    try: return isinstance(host, str) and (host == 'localhost' or ipaddress.ip_address(host).is_loopback)
    except ValueError: return False
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address): raise OSError('network blocked: ' + str(address))
    return _connect(self, address)
socket.socket.connect = connect
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local((host if isinstance(host, str) else host.decode(),)): raise OSError('network blocked: ' + str(host))
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
'''

PAGES = {'/docs': ['swagger-ui-bundle.js', 'swagger-ui.css', 'favicon.png'], '/redoc': ['redoc.standalone.js', 'favicon.png']}
KIND = {'.js': 'javascript', '.css': 'text/css', '.png': 'image/png', '.json': 'application/json'}


def urls(html):
    "Every URL a page loads or calls: src, href, ReDoc's spec-url and Swagger UI's `url:`."
    return [a or b for a, b in re.findall(r'(?:src|href|spec-url)="([^"]*)"|\burl: \'([^\']*)\'', html)]


def check_pages(get):
    "`get(path)` -> response: both pages name only local files, each answers 200 with its kind, the scripts are the real bundles."
    for page, files in PAGES.items():
        r = get(page)
        assert r.status_code == 200 and r.headers['content-type'].startswith('text/html'), (page, r.status_code)
        found = urls(r.text)
        assert sorted(found) == sorted([f'{ASSETS}/{f}' for f in files] + ['/openapi.json']), (page, found)
        assert not re.search(r'https?:|//[\w.-]+\.\w', r.text), (page, r.text)   # no absolute or protocol-relative URL at all
        for u in found:
            got = get(u)
            assert got.status_code == 200 and KIND[u[u.rfind('.'):]] in got.headers['content-type'], (u, got.status_code, got.headers)
    assert b'SwaggerUIBundle' in get(f'{ASSETS}/swagger-ui-bundle.js').content
    assert b'Redoc' in get(f'{ASSETS}/redoc.standalone.js').content and len(get(f'{ASSETS}/swagger-ui.css').content) > 10_000
    assert get(f'{ASSETS}/../../settings.ini').status_code == 404 and get(f'{ASSETS}/missing.js').status_code == 404


@pytest.fixture
def blocked(tmp_path):
    "A folder holding the network-blocking sitecustomize, for PYTHONPATH."
    (tmp_path/'nonet').mkdir()
    (tmp_path/'nonet'/'sitecustomize.py').write_text(NO_NETWORK)
    return tmp_path/'nonet'


def test_the_blocker_blocks(blocked):
    "The sitecustomize really stops a connection to anything but loopback (so the server test below could fail)."
    code = ("import socket\nassert socket.socket.connect.__module__ == socket.getaddrinfo.__module__ == 'sitecustomize'\n"  # else stop here
            "for call in (lambda: socket.getaddrinfo('cdn.jsdelivr.net', 443), lambda: socket.socket().connect(('203.0.113.1', 443))):\n"
            "    try: call()\n    except OSError as e: print(e)\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); socket.create_connection(s.getsockname(), timeout=1); print('loopback ok')")
    out = subprocess.run([sys.executable, '-c', code], env={'PYTHONPATH': str(blocked)}, capture_output=True, text=True, timeout=30)
    assert out.stdout.splitlines() == ['network blocked: cdn.jsdelivr.net', "network blocked: ('203.0.113.1', 443)", 'loopback ok'], out


def test_docs_served_by_the_app(store, monkeypatch):
    "In process: the pages and their files come from the app, whether or not a model is served."
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    with TestClient(app) as c:
        check_pages(c.get)
        assert c.get('/health/ready').status_code == 503   # no champion: the docs work regardless


def test_docs_on_a_real_server_with_the_network_blocked(store, champion, api_server, blocked):
    "uvicorn with the image's command, able to reach nothing but loopback: /docs, /redoc and every file they name answer."
    server = api_server({'FRAUD_MLOPS_STORE': store.uri, 'PYTHONPATH': str(blocked)})
    with httpx.Client(base_url=server.url, timeout=10) as c: check_pages(c.get)


def test_the_schema_names_the_features(store, monkeypatch):
    "The 30 numbers of a transaction and of a batch row are named in order, and the example is shown feature by feature."
    spec = app.openapi()
    tx, batch = spec['components']['schemas']['Transaction'], spec['components']['schemas']['Batch']
    order = [re.sub(r'^\d+ ', '', x) for x in tx['properties']['features']['description'].split(': ', 1)[1].split(', ')]
    assert order == FEATURES and FEATURES[:2] == ['Time', 'V1'] and FEATURES[-1] == 'Amount'
    assert batch['properties']['instances']['description'].endswith(tx['properties']['features']['description'].split(': ', 1)[1])
    table = re.findall(r'^\| (\d+) \| (\w+) \| (\S+) \|$', tx['description'], re.M)
    assert [(int(i), f) for i, f, _ in table] == list(enumerate(FEATURES))
    assert [float(v) for *_, v in table] == pytest.approx(tx['examples'][0]['features'], rel=1e-5)


@pytest.mark.skipif(not (shutil.which('chromium') or shutil.which('chromium-browser')), reason='needs chromium (apt-get install chromium)')
@pytest.mark.parametrize('page, shows', [('/docs', ['/predict/batch', 'Transaction', 'opblock-summary']), ('/redoc', ['/predict/batch', 'Amount'])])
def test_a_browser_renders_the_pages_offline(store, champion, api_server, blocked, tmp_path, page, shows):
    "Headless Chromium (no internet here) renders each page from the app's files alone: the routes and models appear."
    server = api_server({'FRAUD_MLOPS_STORE': store.uri, 'PYTHONPATH': str(blocked)})
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    dom = subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', f'--user-data-dir={tmp_path}/chrome',
                          '--virtual-time-budget=8000', '--dump-dom', server.url + page], capture_output=True, text=True, timeout=120).stdout
    for text in shows: assert text in dom, (page, text, dom[:2000])
