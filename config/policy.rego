# Example access policy for ztgate's embedded Rego engine.
#
# The gateway evaluates data.ztgate.decision for every connection and again
# during the session. The input document is described in docs/policy.md;
# the inventory, grants and networks come from config/policy-data.json.
#
# Rules, in order:
#   0. a device whose pushed posture says compliant = false is denied;
#   1. a device missing from the inventory is denied;
#   2. a device needs a group granted the application at its sensitivity;
#   3. applications labelled sensitivity = "high" need a hardware-bound key;
#   4. outside working hours and outside the office and home networks the
#      device must step up, unless its posture says the step-up was done;
#   5. otherwise allow, for five minutes before the next evaluation.
package ztgate

import rego.v1

sensitivity_rank := {"low": 1, "medium": 2, "high": 3}

device := data.access.devices[input.device.device_id]

app_sensitivity := object.get(input.application.labels, "sensitivity", "low")

granted if {
	some group in device.groups
	grant := data.access.grants[group]
	input.application.name in grant.applications
	sensitivity_rank[app_sensitivity] <= sensitivity_rank[grant.max_sensitivity]
}

hardware_ok if app_sensitivity != "high"

hardware_ok if input.device.hardware_bound

trusted_network if {
	some name in ["office", "home"]
	some cidr in data.access.networks[name]
	net.cidr_contains(cidr, input.network.client_address)
}

hour := time.clock(time.parse_rfc3339_ns(input.time))[0]

working_hours if {
	hour >= data.access.working_hours.start
	hour < data.access.working_hours.end
}

stepped_up if input.session.posture.step_up_done == true

decision := {
	"outcome": "deny",
	"rule": "posture",
	"reason": "the device reported itself non-compliant",
	"remediation": data.access.enrol_url,
} if {
	input.session.posture.compliant == false
} else := {
	"outcome": "deny",
	"rule": "inventory",
	"reason": sprintf("device %s is not in the inventory", [input.device.device_id]),
	"remediation": data.access.enrol_url,
} if {
	not device
} else := {
	"outcome": "deny",
	"rule": "grant",
	"reason": sprintf("no group of device %s is granted %s at sensitivity %s", [input.device.device_id, input.application.name, app_sensitivity]),
	"remediation": data.access.access_request_url,
} if {
	not granted
} else := {
	"outcome": "deny",
	"rule": "hardware-bound",
	"reason": sprintf("%s is sensitive and requires a hardware-bound key", [input.application.name]),
	"remediation": data.access.enrol_url,
} if {
	not hardware_ok
} else := {
	"outcome": "step_up",
	"rule": "untrusted-network-after-hours",
	"reason": "connection from outside the office and home networks outside working hours",
	"challenge": data.access.step_up_url,
	"grace_secs": 120,
} if {
	not trusted_network
	not working_hours
	not stepped_up
} else := {
	"outcome": "allow",
	"rule": "grant",
	"lifetime_secs": 300,
}
