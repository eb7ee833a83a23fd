# The sidecar task definition of sidecar-task-definition.json, in Terraform
# (AWS provider 5 or later), with its task and execution roles.

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "app_image" {
  type        = string
  description = "The app's image, e.g. 111122223333.dkr.ecr.eu-west-1.amazonaws.com/app:1.4.2"
}

variable "envrender_image" {
  type        = string
  description = "envrender's image with this folder's envrender.toml and app.conf.hbs (Containerfile)"
}

variable "consul_http_addr" {
  type    = string
  default = "consul.internal.example.com:8500"
}

variable "vault_addr" {
  type    = string
  default = "https://vault.internal.example.com:8200"
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
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
  family                   = "app"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  pid_mode                 = "task"
  cpu                      = "512"
  memory                   = "1024"
  task_role_arn            = aws_iam_role.task.arn
  execution_role_arn       = aws_iam_role.execution.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "app-config"
  }

  volume {
    name = "envrender-state"
  }

  container_definitions = jsonencode([
    {
      name      = "envrender"
      image     = var.envrender_image
      essential = false
      restartPolicy = {
        enabled              = true
        restartAttemptPeriod = 60
      }
      command = [
        "watch",
        "--config", "/etc/envrender/envrender.toml",
        "--signal", "SIGHUP",
        "--process-name", "server",
        "--wait", "2s:10s",
        "--listen", "127.0.0.1:9102",
      ]
      environment = [
        { name = "CONSUL_HTTP_ADDR", value = var.consul_http_addr },
        { name = "VAULT_ADDR", value = var.vault_addr },
      ]
      healthCheck = {
        command     = ["CMD", "/envrender", "probe", "127.0.0.1:9102"]
        interval    = 5
        timeout     = 3
        retries     = 3
        startPeriod = 120
      }
      mountPoints = [
        { sourceVolume = "app-config", containerPath = "/run/app", readOnly = false },
        { sourceVolume = "envrender-state", containerPath = "/run/envrender", readOnly = false },
      ]
      user                   = "65532:65532"
      readonlyRootFilesystem = true
      cpu                    = 32
      memoryReservation      = 32
      memory                 = 64
      linuxParameters        = { capabilities = { drop = ["ALL"] } }
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.app.name
          awslogs-region        = var.region
          awslogs-stream-prefix = "envrender"
        }
      }
    },
    {
      name         = "app"
      image        = var.app_image
      essential    = true
      command      = ["/app/server", "--config", "/run/app/app.conf"]
      dependsOn    = [{ containerName = "envrender", condition = "HEALTHY" }]
      portMappings = [{ containerPort = 8080, protocol = "tcp" }]
      mountPoints = [
        { sourceVolume = "app-config", containerPath = "/run/app", readOnly = true },
      ]
      user                   = "65532:65532"
      readonlyRootFilesystem = true
      linuxParameters        = { capabilities = { drop = ["ALL"] } }
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.app.name
          awslogs-region        = var.region
          awslogs-stream-prefix = "app"
        }
      }
    },
  ])
}
