# The sidecar task definition of sidecar-task-definition.json, in Terraform
# (AWS provider 5 or later), with its task and execution roles and log group.
# The policies and the awslogs settings name eu-west-1 and account
# 111122223333 as the JSON files do: replace them in those files.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

variable "app_image" {
  type        = string
  description = "The app's image, e.g. 111122223333.dkr.ecr.eu-west-1.amazonaws.com/app:1.4.2"
}

variable "envrender_image" {
  type        = string
  description = "envrender's image with this folder's envrender.toml and app.conf.hbs (Containerfile)"
}

variable "cpu_architecture" {
  type        = string
  default     = "ARM64"
  description = "ARM64 (Graviton: cheaper on Fargate) or X86_64; envrender's image has both, the app's image and the ECS image (Containerfile) must have this one"
  validation {
    condition     = contains(["ARM64", "X86_64"], var.cpu_architecture)
    error_message = "cpu_architecture is ARM64 or X86_64."
  }
}

locals {
  # The task definition is sidecar-task-definition.json itself (edit it there),
  # with this module's images and roles.
  task   = jsondecode(file("${path.module}/sidecar-task-definition.json"))
  images = { envrender = var.envrender_image, app = var.app_image }
}

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

# ECS may assume the roles only for tasks of this account and region (no
# confused deputy).
data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:aws:ecs:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:*"]
    }
  }
}

resource "aws_iam_role" "task" {
  name               = "app-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy" "task" {
  name   = "envrender-reads"
  role   = aws_iam_role.task.id
  policy = file("${path.module}/task-role-policy.json")
}

resource "aws_iam_role" "execution" {
  name               = "app-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy" "execution" {
  name   = "pull-and-log"
  role   = aws_iam_role.execution.id
  policy = file("${path.module}/execution-role-policy.json")
}

resource "aws_cloudwatch_log_group" "app" {
  name              = "/ecs/app"
  retention_in_days = 30
}

resource "aws_ecs_task_definition" "app" {
  family                   = local.task.family
  requires_compatibilities = local.task.requiresCompatibilities
  network_mode             = local.task.networkMode
  pid_mode                 = local.task.pidMode
  cpu                      = local.task.cpu
  memory                   = local.task.memory
  task_role_arn            = aws_iam_role.task.arn
  execution_role_arn       = aws_iam_role.execution.arn

  runtime_platform {
    operating_system_family = local.task.runtimePlatform.operatingSystemFamily
    cpu_architecture        = var.cpu_architecture
  }

  dynamic "volume" {
    for_each = local.task.volumes
    content {
      name = volume.value.name
    }
  }

  container_definitions = jsonencode([
    for c in local.task.containerDefinitions : merge(c, { image = local.images[c.name] })
  ])

  depends_on = [aws_cloudwatch_log_group.app]
}
