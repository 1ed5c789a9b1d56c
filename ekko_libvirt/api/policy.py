"""Who may do what: oslo.policy rules with their defaults in code (a policy file only overrides).

Keystone's default roles imply each other (admin -> member -> reader) in the tokens it issues;
the rules spell every role out anyway, so a deployment without the implied roles still works.
Project scope is not a rule here: every query is confined to the token's project (another
project's id answers 404 whatever the role), and only `ekko:all_projects` lifts that."""

from typing import Dict, List

from oslo_config import cfg
from oslo_policy import policy

READER = "role:reader or role:member or role:admin"
MEMBER = "role:member or role:admin"
ADMIN = "role:admin"


def _rule(name: str, check: str, desc: str, method: str, path: str) -> policy.DocumentedRuleDefault:
    return policy.DocumentedRuleDefault(name=name, check_str=check, description=desc,
                                        operations=[{"method": method, "path": path}])


RULES: List[policy.DocumentedRuleDefault] = [
    _rule("ekko:instance:list", READER, "List the project's instances that have backups.", "GET", "/v1/instances"),
    _rule("ekko:backup:list", READER, "List an instance's backups.", "GET", "/v1/instances/{uuid}/backups"),
    _rule("ekko:backup:show", READER, "Show one backup.", "GET", "/v1/backups/{backup_id}"),
    _rule("ekko:backup:create", MEMBER, "Back an instance up now.", "POST", "/v1/instances/{uuid}/backups"),
    _rule("ekko:job:show", READER, "Show a job.", "GET", "/v1/jobs/{job_id}"),
    _rule("ekko:backup:protect", MEMBER, "Protect or unprotect a backup.", "PUT", "/v1/backups/{backup_id}/protection"),
    _rule("ekko:backup:delete", MEMBER, "Delete a backup.", "DELETE", "/v1/backups/{backup_id}"),
    _rule("ekko:file:list", MEMBER, "List files in a backup.", "GET", "/v1/backups/{backup_id}/files"),
    _rule("ekko:file:get", MEMBER, "Download a file from a backup.", "GET", "/v1/backups/{backup_id}/files/content"),
    _rule("ekko:backup:restore", MEMBER, "Restore a backup's disk as a Glance image.", "POST",
          "/v1/backups/{backup_id}/restore"),
    _rule("ekko:usage:show", READER, "The project's store usage.", "GET", "/v1/usage"),
    _rule("ekko:all_projects", ADMIN, "Act on every project (?all_projects=1).", "GET", "/v1/instances?all_projects=1"),
    _rule("ekko:admin:hosts", ADMIN, "List hosts and their agents.", "GET", "/v1/admin/hosts"),
]


def enforcer(conf: cfg.ConfigOpts) -> policy.Enforcer:
    e = policy.Enforcer(conf)
    e.register_defaults(RULES)
    return e


def allowed(e: policy.Enforcer, rule: str, creds: Dict) -> bool:
    """The rule against the caller's credentials (roles, project_id, user_id). Unknown rule names
    raise (PolicyNotRegistered): a typo must not pass as 'allowed'."""
    return bool(e.authorize(rule, {"project_id": creds.get("project_id")}, creds, do_raise=False))


def list_rules():
    """For oslopolicy-sample-generator (entry point oslo.policy.policies: ekko)."""
    return RULES
