//! Posture attributes pushed for devices through the admin API, passed to
//! the policy engine as `input.session.posture`.

use std::collections::HashMap;
use std::sync::Mutex;

/// The latest posture attributes of each device, by device identifier.
#[derive(Debug, Default)]
pub struct PostureStore {
    devices: Mutex<HashMap<String, serde_json::Map<String, serde_json::Value>>>,
}

impl PostureStore {
    /// Replaces the attributes of one device.
    pub fn set(&self, device_id: &str, attributes: serde_json::Map<String, serde_json::Value>) {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device_id.to_string(), attributes);
    }

    /// The attributes of a device as a JSON object (empty when none were pushed).
    pub fn get(&self, device_id: &str) -> serde_json::Value {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::Value::Object(devices.get(device_id).cloned().unwrap_or_default())
    }
}
