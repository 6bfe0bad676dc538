"""`fraud-mlops deploy` against moto: the README's path from an empty account (the CloudFormation stack of
.aws/cloudformation.yml, the first deployment, the service, the next deployment), and the command's failures
as a user meets them, over HTTP against a moto server."""
import json, os, subprocess, sys, time, uuid
from datetime import datetime, timezone
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from botocore.exceptions import ClientError

from fraud_mlops.deploy import DeployError, container, deploy, find_service, load_task_definition, signing_key_secret

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT/'.aws'/'cloudformation.yml'
TASK_DEFINITION = ROOT/'.aws'/'task-definition.json'
BIN = Path(sys.executable).parent


@pytest.fixture
def moto_aws(aws_env):
    "moto's in-process AWS (no network) in region eu-west-1."
    from moto import mock_aws
    aws_env(AWS_DEFAULT_REGION='eu-west-1')
    with mock_aws(): yield


def create_or_update(cfn, stack, **parameters):
    "Create stack `stack` from the committed template (update it if it exists); return its outputs."
    body = TEMPLATE.read_text()
    # moto's CloudFormation has no AWS::SecretsManager::Secret: it skips the resource and drops the output that
    # refers to it, so the test makes the secret itself and puts its ARN into that one output.
    sm = boto3.client('secretsmanager')
    try: secret = sm.describe_secret(SecretId=f'{stack}/admin-token')['ARN']
    except ClientError: secret = sm.create_secret(Name=f'{stack}/admin-token', SecretString='t')['ARN']
    assert body.count('Value: !Ref AdminToken') == 1
    body = body.replace('Value: !Ref AdminToken', f'Value: {secret}')
    key_arn, public = signing_key_secret(stack, sm, log=lambda m: None)   # the tutorial's step 0
    parameters = {'GitHubRepository': 'someone/fraud-mlops', 'SigningKeySecretArn': key_arn, 'SigningPublicKeys': public, **parameters}
    params = [{'ParameterKey': k, 'ParameterValue': v} for k, v in parameters.items()]
    kw = dict(StackName=stack, TemplateBody=body, Capabilities=['CAPABILITY_NAMED_IAM'], Parameters=params)
    try: cfn.describe_stacks(StackName=stack); cfn.update_stack(**kw)
    except ClientError: cfn.create_stack(**kw)
    s = cfn.describe_stacks(StackName=stack)['Stacks'][0]
    assert s['StackStatus'] in ('CREATE_COMPLETE', 'UPDATE_COMPLETE'), s.get('StackStatusReason')
    return {o['OutputKey']: o['OutputValue'] for o in s['Outputs']}


def push(ecr, image):
    "Put a manifest for `image` (REPOSITORY_URI:TAG) into moto's ECR, as the workflow's `docker push` does."
    repo, tag = image.split('/', 1)[1].rsplit(':', 1)
    ecr.put_image(repositoryName=repo, imageManifest='{"schemaVersion": 2}', imageTag=tag,
                  imageManifestMediaType='application/vnd.oci.image.manifest.v1+json')


@pytest.mark.slow                                           # the README's whole deploy flow
@pytest.mark.filterwarnings("ignore:Tried to parse AWS::")   # moto skips three resource types; see create_or_update
def test_from_an_empty_account_to_a_deployed_api(moto_aws):
    cfn, ecs, ecr, events = (boto3.client(s) for s in ('cloudformation', 'ecs', 'ecr', 'events'))
    outputs = create_or_update(cfn, 'fraud-mlops')
    assert 'ApiServiceName' not in outputs and ecs.list_services(cluster=outputs['ClusterName'])['serviceArns'] == []
    image, training = f"{outputs['ApiRepositoryUri']}:{'a' * 40}", f"{outputs['TrainingRepositoryUri']}:{'a' * 40}"

    # an image that was never pushed is refused before anything is registered
    with pytest.raises(DeployError, match=f'image {image} is not in ECR: push it first'):
        deploy(TASK_DEFINITION, image, stack='fraud-mlops', log=lambda m: None)
    assert ecs.list_task_definitions(familyPrefix='fraud-mlops-api')['taskDefinitionArns'] == []
    push(ecr, image); push(ecr, training)

    # first push: the revision is registered, the schedule runs the pushed training image (to train the first model),
    # and the command stops with what to run next
    with pytest.raises(DeployError) as e:
        deploy(TASK_DEFINITION, image, stack='fraud-mlops', log=lambda m: None, training_image=training)
    first = 'arn:aws:ecs:eu-west-1:123456789012:task-definition/fraud-mlops-api:1'
    assert f'stack fraud-mlops has no API service yet (first deployment): registered {first}' in str(e.value)
    assert f'--parameter-overrides ApiTaskDefinition={first}' in str(e.value)
    assert scheduled_training(ecs, events, outputs)['image'] == training

    # the stack, given that revision, creates the service; every later push deploys to it
    outputs = create_or_update(cfn, 'fraud-mlops', ApiTaskDefinition=first)
    assert find_service(ecs, outputs['ClusterName'], outputs['ApiServiceName'])['taskDefinition'] == first
    image2, training2 = f"{outputs['ApiRepositoryUri']}:{'b' * 40}", f"{outputs['TrainingRepositoryUri']}:{'b' * 40}"
    push(ecr, image2); push(ecr, training2)
    arn = deploy(TASK_DEFINITION, image2, stack='fraud-mlops', wait=False, log=lambda m: None, training_image=training2)
    assert arn.endswith('task-definition/fraud-mlops-api:2')
    service = find_service(ecs, 'fraud-mlops', 'fraud-mlops-api')
    assert service['taskDefinition'] == arn

    td = ecs.describe_task_definition(taskDefinition=arn)['taskDefinition']
    api = container(td, 'api')
    assert api['image'] == image2
    assert (td['executionRoleArn'], td['taskRoleArn']) == (outputs['TaskExecutionRoleArn'], outputs['ApiTaskRoleArn'])
    env = {e['name']: e['value'] for e in api['environment']}
    assert env['FRAUD_MLOPS_STORE'] == outputs['ModelStoreUri'] and env['FRAUD_MLOPS_STORE'].startswith('s3://')
    assert api['secrets'] == [{'name': 'FRAUD_MLOPS_ADMIN_TOKEN', 'valueFrom': outputs['AdminTokenSecretArn']}]
    assert env['FRAUD_MLOPS_PUBLIC_KEYS'] == outputs['SigningPublicKeys'] and 'FRAUD_MLOPS_SIGNING_KEY' not in env

    # the keys: the private one only in the training task (from the secret), the public one in both
    key_arn, public = signing_key_secret('fraud-mlops', log=lambda m: None)
    assert outputs['SigningPublicKeys'] == public
    trainer = scheduled_training(ecs, events, outputs)
    assert trainer['image'] == training2 and trainer['secrets'] == [{'name': 'FRAUD_MLOPS_SIGNING_KEY', 'valueFrom': key_arn}]
    assert {'name': 'FRAUD_MLOPS_PUBLIC_KEYS', 'value': public} in trainer['environment']
    job = training_container()   # the pushed image runs the stack's job (monitor, then retrain only if needed), not its own
    assert (trainer['entryPoint'], trainer['command']) == (job['EntryPoint'], job['Command'])
    assert {'name': 'RETRAIN_WHEN', 'value': 'psi>0.2,recall<0.6'} in trainer['environment']
    options = api['logConfiguration']['options']
    assert (options['awslogs-group'], options['awslogs-region']) == (outputs['ApiLogGroup'], 'eu-west-1')
    assert '123456789012:role/fraud-mlops' in td['taskRoleArn']   # moto's account, not a value from the file
    committed = load_task_definition(TASK_DEFINITION)
    assert (td['cpu'], td['memory'], api['healthCheck']) == (committed['cpu'], committed['memory'],
                                                             container(committed, 'api')['healthCheck'])


def scheduled_training(ecs, events, outputs):
    "The training container of the task definition that the stack's schedule runs."
    target, = events.list_targets_by_rule(Rule=outputs['TrainingScheduleRule'])['Targets']
    td = ecs.describe_task_definition(taskDefinition=target['EcsParameters']['TaskDefinitionArn'])['taskDefinition']
    assert td['family'] == outputs['TrainingTaskFamily']
    return container(td, 'training')


# --- the weekly training task: monitor, and retrain only when a condition holds

def template():
    from cfnlint.decode import decode
    t, problems = decode(str(TEMPLATE))
    assert not problems
    return t


def training_container():
    "The training container of the stack's task definition, as the template writes it."
    c, = template()['Resources']['TrainingTaskDefinition']['Properties']['ContainerDefinitions']
    return c


def test_the_api_may_create_log_and_label_files_and_training_reads_them():
    r = template()['Resources']
    statements = lambda role: [s for p in r[role]['Properties']['Policies'] for s in p['PolicyDocument']['Statement']]
    writes = [s for s in statements('ApiTaskRole') if s['Action'] != 's3:GetObject' and s['Action'] != 's3:ListBucket']
    assert writes == [{'Effect': 'Allow', 'Action': 's3:PutObject',
                       'Resource': [{'Fn::Sub': '${ModelBucket.Arn}/registry/predictions/*'}, {'Fn::Sub': '${ModelBucket.Arn}/registry/labels/*'}],
                       'Condition': {'Null': {'s3:if-none-match': 'false'}}}]   # new files only: the API never replaces one
    reads = [s for s in statements('TrainingTaskRole') if 's3:GetObject' in s['Action']]
    assert [s['Resource'] for s in reads] == [{'Fn::Sub': '${ModelBucket.Arn}/registry/*'}]   # predictions/ and labels/ among them


FAKE_CLI = """#!/bin/sh
# fraud-mlops as the job sees it: each call logged, `models --json` from $FAKE_MODELS, exit codes from $FAKE_EXIT_<command>
echo "$*" >> "$CALLS"
case $1 in models) printf '%s' "$FAKE_MODELS" ;; esac
eval "code=\\${FAKE_EXIT_$(echo "$1" | tr - _):-0}"
exit "$code"
"""


@pytest.fixture
def weekly_job(tmp_path):
    """`weekly_job(rows, **exits)`: run the training task's command with `sh -c` (its environment from the template's defaults)
    against a fake `fraud-mlops` (`rows`: what its `models --json` prints; `exits`: exit code per command, e.g. monitor=3);
    return (exit code, [the commands it ran], its output)."""
    job, params = training_container(), template()['Parameters']
    value = lambda v: v if isinstance(v, str) else str(params[v['Ref']].get('Default', v['Ref'])) if 'Ref' in v else 's3://bucket/registry'
    env = {e['Name']: value(e['Value']) for e in job['Environment']}
    fake = tmp_path/'bin'; fake.mkdir()
    (fake/'fraud-mlops').write_text(FAKE_CLI); (fake/'fraud-mlops').chmod(0o755)
    def run(rows, **exits):
        calls = tmp_path/'calls'; calls.unlink(missing_ok=True)
        extra = {f'FAKE_EXIT_{k}': str(v) for k, v in exits.items()}
        r = subprocess.run([*job['EntryPoint'], *job['Command']], capture_output=True, text=True,
                           env={**env, **extra, 'PATH': f"{fake}:{BIN}:/usr/bin:/bin", 'CALLS': str(calls), 'FAKE_MODELS': json.dumps(rows)})
        return r.returncode, calls.read_text().splitlines() if calls.exists() else [], r.stdout + r.stderr
    return run


CHAMPION = [{'version': 'v2', 'status': 'champion'}, {'version': 'v1', 'status': 'retired'}]


def days_ago(arg):
    "Days between now and the UTC time `arg` (YYYY-MM-DDTHH:MM:SSZ)."
    return (datetime.now(timezone.utc) - datetime.strptime(arg, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)).total_seconds() / 86400


def test_the_weekly_task_retrains_only_when_a_condition_holds(weekly_job):
    code, calls, out = weekly_job(CHAMPION, monitor=0)   # nothing wrong: no data fetched, nothing trained
    assert code == 0 and [c.split()[0] for c in calls] == ['models', 'monitor'] and 'no retraining' in out, out
    monitor = calls[1].split()
    assert monitor[monitor.index('--fail-on') + 1] == 'psi>0.2,recall<0.6'
    assert abs(days_ago(monitor[monitor.index('--since') + 1]) - 7) < 0.01

    code, calls, out = weekly_job(CHAMPION, monitor=3)   # a condition holds: original data + labelled traffic, train, gate
    assert code == 0, out
    assert calls[2:] == ['fetch-data --dest /tmp/creditcard.csv', calls[3], 'train --data /tmp/retrain.csv', 'promote'], calls
    export = calls[3].split()
    assert export[:4] == ['export-training-data', '/tmp/retrain.csv', '--append-to', '/tmp/creditcard.csv']
    assert abs(days_ago(export[export.index('--since') + 1]) - 90) < 0.01

    for step, failed in (('monitor', 4), ('monitor', 2), ('export_training_data', 2), ('train', 1)):
        code, calls, out = weekly_job(CHAMPION, **{'monitor': 3, step: failed})
        assert code == failed and 'promote' not in calls, (step, calls, out)   # a failed step stops the job with its code


def test_a_new_stack_trains_its_first_model_without_monitoring(weekly_job):
    for models in ([], [{'version': 'v1', 'status': 'rejected'}]):
        code, calls, out = weekly_job(models, monitor=3)
        assert code == 0 and calls == ['models --json', 'fetch-data --dest /tmp/creditcard.csv', 'train --data /tmp/creditcard.csv', 'promote'], (calls, out)
    code, calls, out = weekly_job([], models=4)   # the store unreachable (whatever was printed): the job fails, trains nothing
    assert code != 0 and calls == ['models --json'], out


STAND_IN = """#!/bin/sh
# the real fraud-mlops, except that fetch-data copies the CI subset (no network) and train skips the report's comparisons
case $1 in
  fetch-data) cp "$CI_DATA" "$3" ;;
  train) exec "$REAL" "$@" -p compare_with '' -p n_boot 100 ;;
  *) exec "$REAL" "$@" ;;
esac
"""


@pytest.mark.slow   # a training job
def test_the_weekly_job_retrains_for_real_when_an_input_moved(tmp_path, store, champion, ci_df):
    "The job's shell with the real commands on a local store: a week of logged traffic with V14 moved and its labels -> retrained, decided."
    from fraud_mlops.data import CI_SUBSET, FEATURES
    from fraud_mlops.labels import add_labels, labels_from_records
    from fraud_mlops.predlog import PredictionLog
    from fraud_mlops.registry import list_decisions
    day2 = ci_df[ci_df.Time >= 86_400]
    X = day2[FEATURES].to_numpy(copy=True); X[:, FEATURES.index('V14')] += 3
    ids = [f'tx-{i}' for i in day2.index]
    log = PredictionLog(store)
    log.record_many(time.time() - 86_400, 'weekly-test', ids, champion, np.zeros(len(X)), np.zeros(len(X), bool), X)
    log.close()
    add_labels(store, labels_from_records([{'transaction_id': i, 'label': int(c)} for i, c in zip(ids, day2.Class)]), 'test')
    fake = tmp_path/'bin'; fake.mkdir()
    (fake/'fraud-mlops').write_text(STAND_IN); (fake/'fraud-mlops').chmod(0o755)
    job = training_container()
    env = {**os.environ, 'PATH': f"{fake}:{BIN}:/usr/bin:/bin", 'REAL': str(BIN/'fraud-mlops'), 'CI_DATA': str(ROOT/CI_SUBSET),
           'FRAUD_MLOPS_STORE': str(store.root), 'DATA_PATH': str(tmp_path/'creditcard.csv'), 'RETRAIN_PATH': str(tmp_path/'retrain.csv'),
           'RETRAIN_WHEN': 'psi>0.2,recall<0.6', 'MONITOR_DAYS': '7', 'EXPORT_DAYS': '90'}
    r = subprocess.run([*job['EntryPoint'], *job['Command']], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'retraining: a condition of psi>0.2,recall<0.6 holds' in r.stdout and 'V14' in r.stderr   # monitor names what held
    assert len(pd.read_csv(tmp_path/'retrain.csv')) == len(ci_df) + len(day2)                    # the original, then the week
    decision = list_decisions(store)[-1]
    assert decision['candidate'] != champion and decision['decision'] in ('promoted', 'rejected'), decision


def test_the_weekly_job_passes_shellcheck():
    job = training_container()
    r = subprocess.run([Path(sys.executable).parent/'shellcheck', '-s', 'sh', '-'], input=job['Command'][0], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# --- the command, over HTTP against a moto server, as the workflow runs it

@pytest.fixture
def ecs_service(moto_server, aws_env):
    "A fresh cluster with service `api` on the moto server; the environment points there. Returns the cluster name."
    aws_env(moto_server)
    cluster = f'fraud-{uuid.uuid4().hex[:8]}'
    ecs = boto3.client('ecs')
    ecs.create_cluster(clusterName=cluster)
    first = ecs.register_task_definition(**load_task_definition(TASK_DEFINITION))['taskDefinition']['taskDefinitionArn']
    ecs.create_service(cluster=cluster, serviceName='api', taskDefinition=first, desiredCount=2, launchType='FARGATE')
    return cluster


@pytest.fixture
def deploy_cli(cli):
    "`deploy_cli(*args)`: `fraud-mlops deploy ARGS` from the project folder, as the workflow runs it."
    return lambda *args: cli('deploy', *args, cwd=ROOT)


def test_deploy_prints_the_new_revision_and_the_service_runs_it(ecs_service, deploy_cli):
    r = deploy_cli('--cluster', ecs_service, '--service', 'api', '--image', 'registry.example/api:c0ffee', '--no-wait',
            '--env', 'FRAUD_MLOPS_POLL_SECONDS=30')
    assert r.returncode == 0, r.stderr
    arn = r.stdout.strip()
    assert arn.startswith('arn:aws:ecs:') and f'registered {arn}' in r.stderr
    ecs = boto3.client('ecs')
    assert ecs.describe_services(cluster=ecs_service, services=['api'])['services'][0]['taskDefinition'] == arn
    api = container(ecs.describe_task_definition(taskDefinition=arn)['taskDefinition'], 'api')
    assert api['image'] == 'registry.example/api:c0ffee'
    assert {'name': 'FRAUD_MLOPS_POLL_SECONDS', 'value': '30'} in api['environment']


@pytest.mark.slow
def test_deploy_errors_name_the_problem_and_register_nothing(ecs_service, deploy_cli, tmp_path):
    ecs = boto3.client('ecs')
    before = ecs.list_task_definitions()['taskDefinitionArns']
    image = ['--image', 'registry.example/api:1']
    cases = [
        (['--cluster', 'no-such-cluster', '--service', 'api'], 'cluster no-such-cluster not found in region us-east-1'),
        (['--cluster', ecs_service, '--service', 'apj'], f'service apj not found on cluster {ecs_service} (MISSING'),
        (['--cluster', ecs_service, '--service', 'api', '--container', 'web'], "has no container 'web' (it has: api)"),
        (['--stack', 'no-such-stack'], 'stack no-such-stack not found in region us-east-1'),
        (['--cluster', ecs_service], 'no service: pass --service, or --stack'),
        (['--cluster', ecs_service, '--service', 'api', '--env', 'NOEQUALS'], "--env 'NOEQUALS': write NAME=VALUE"),
    ]
    ecr_image = ['--image', '123456789012.dkr.ecr.us-east-1.amazonaws.com/no-such-repo:1']
    cases.append((['--cluster', ecs_service, '--service', 'api', *ecr_image],
                  'ECR repository no-such-repo not found in account 123456789012, region us-east-1'))
    bad_json = tmp_path/'broken.json'
    bad_json.write_text(TASK_DEFINITION.read_text().replace('"cpu": "256",', '"cpu": "256"'))
    cases.append((['--cluster', ecs_service, '--service', 'api', '--task-definition', bad_json],
                  'broken.json is not valid JSON: Expecting'))
    for args, message in cases:
        r = deploy_cli(*image, *args)   # a later --image wins
        assert (r.returncode, r.stdout) == (2, ''), (args, r.stderr)
        assert message in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
    assert ecs.list_task_definitions()['taskDefinitionArns'] == before


def test_deploy_rejected_by_ecs_and_unstable_service_fail_clearly(ecs_service, deploy_cli, tmp_path):
    wrong_type = tmp_path/'td.json'
    wrong_type.write_text(TASK_DEFINITION.read_text().replace('"cpu": "256"', '"cpu": 256'))
    r = deploy_cli('--cluster', ecs_service, '--service', 'api', '--image', 'img:1', '--task-definition', wrong_type)
    assert r.returncode == 2 and 'registering task definition fraud-mlops-api: Parameter validation failed' in r.stderr
    assert 'Invalid type for parameter cpu' in r.stderr
    # moto starts no tasks, so the service never becomes stable: the wait gives up with the service named
    r = deploy_cli('--cluster', ecs_service, '--service', 'api', '--image', 'img:2', '--timeout', '2', '--poll', '1')
    assert r.returncode == 2 and f'service api on cluster {ecs_service} was not stable on arn:aws:ecs:' in r.stderr
    assert f'aws ecs describe-services --cluster {ecs_service} --services api' in r.stderr


def test_dry_run_prints_the_rendered_task_definition_and_touches_nothing(aws_env, deploy_cli):
    aws_env(AWS_ENDPOINT_URL='http://127.0.0.1:9')   # nothing listens there: a dry run must not call AWS
    r = deploy_cli('--image', 'registry.example/api:d1', '--dry-run', '--env', 'WEB_CONCURRENCY=2')
    assert r.returncode == 0, r.stderr
    td = json.loads(r.stdout)
    assert container(td, 'api')['image'] == 'registry.example/api:d1'
    assert {'name': 'WEB_CONCURRENCY', 'value': '2'} in container(td, 'api')['environment']


def test_signing_key_is_made_once_and_printed_as_the_stack_parameters(moto_server, aws_env, deploy_cli):
    aws_env(moto_server)
    stack = f'fraud-{uuid.uuid4().hex[:8]}'
    first, again = (deploy_cli('--stack', stack, '--signing-key') for _ in range(2))
    assert (first.returncode, again.returncode) == (0, 0), first.stderr
    assert first.stdout == again.stdout and 'made a new signing key' in first.stderr and again.stderr == ''
    params = dict(p.split('=', 1) for p in first.stdout.split())
    assert set(params) == {'SigningKeySecretArn', 'SigningPublicKeys'} and f':secret:{stack}/signing-key-' in params['SigningKeySecretArn']
    pem = boto3.client('secretsmanager').get_secret_value(SecretId=params['SigningKeySecretArn'])['SecretString']
    from fraud_mlops.signing import public_text, read_private_key
    assert public_text(read_private_key(pem)) == params['SigningPublicKeys'] and pem not in first.stdout + first.stderr
