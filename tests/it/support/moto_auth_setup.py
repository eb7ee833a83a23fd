"""Sets up an IAM user on a moto server that enforces IAM after the first
few requests (INITIAL_NO_AUTH_ACTION_COUNT). Prints the user's access key as
JSON. Usage: moto_auth_setup.py ENDPOINT POLICY_JSON NAME=VALUE..."""
import json
import sys

import boto3

endpoint, policy = sys.argv[1], sys.argv[2]
params = [a.split("=", 1) for a in sys.argv[3:]]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="envrender-test")
iam.put_user_policy(UserName="envrender-test", PolicyName="p", PolicyDocument=policy)
key = iam.create_access_key(UserName="envrender-test")["AccessKey"]
ssm = boto3.client("ssm", **kw)
for name, value in params:
    ssm.put_parameter(Name=name, Value=value, Type="String")
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
