//! Typed client of the pdu service (the executor and mars call `cycle`, `set`, `port`).

use dutgate_core::http::encode_component;
use std::time::Duration;

use dutgate_core::Secret;
use dutgate_core::client::{ApiClient, ClientError};
use dutgate_pdu_driver::{DriverInfo, Switch};
use reqwest::Method;

use crate::api::{CycleRequest, DriverList, PduList};
use crate::pdu::{CycleReport, OpResult, PortPatch, PortView};
use crate::service::{NewPdu, PduDetail, PduInfo};
use crate::store::HistoryEntry;

#[derive(Debug, Clone)]
pub struct PduClient {
    api: ApiClient,
}

impl PduClient {
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self {
            api: ApiClient::new(base, token),
        }
    }

    pub fn from_api(api: ApiClient) -> Self {
        Self { api }
    }

    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    pub async fn drivers(&self) -> Result<Vec<DriverInfo>, ClientError> {
        Ok(self.api.get::<DriverList>("/api/v1/drivers").await?.drivers)
    }

    pub async fn pdus(&self) -> Result<Vec<PduInfo>, ClientError> {
        Ok(self.api.get::<PduList>("/api/v1/pdus").await?.pdus)
    }

    pub async fn pdu(&self, name: &str) -> Result<PduDetail, ClientError> {
        self.api
            .get(&format!("/api/v1/pdus/{}", encode_component(name)))
            .await
    }

    pub async fn add(&self, new: &NewPdu) -> Result<PduDetail, ClientError> {
        self.api.post("/api/v1/pdus", new).await
    }

    pub async fn remove(&self, name: &str) -> Result<(), ClientError> {
        self.api
            .delete(&format!("/api/v1/pdus/{}", encode_component(name)))
            .await
    }

    pub async fn ports(&self, pdu: &str) -> Result<Vec<PortView>, ClientError> {
        self.api
            .get(&format!("/api/v1/pdus/{}/ports", encode_component(pdu)))
            .await
    }

    /// The cached state of one port (never touches the device).
    pub async fn port(&self, pdu: &str, port: &str) -> Result<PortView, ClientError> {
        self.api
            .get(&format!(
                "/api/v1/pdus/{}/ports/{}",
                encode_component(pdu),
                encode_component(port)
            ))
            .await
    }

    pub async fn patch(
        &self,
        pdu: &str,
        port: &str,
        patch: &PortPatch,
    ) -> Result<OpResult, ClientError> {
        self.api
            .patch(
                &format!(
                    "/api/v1/pdus/{}/ports/{}",
                    encode_component(pdu),
                    encode_component(port)
                ),
                patch,
            )
            .await
    }

    /// Switches a port; the answer carries the read-back state.
    pub async fn set(&self, pdu: &str, port: &str, state: Switch) -> Result<OpResult, ClientError> {
        self.patch(
            pdu,
            port,
            &PortPatch {
                state: Some(state),
                ..Default::default()
            },
        )
        .await
    }

    /// Power-cycles a port with `off` of verified OFF; waits for the whole cycle.
    pub async fn cycle(
        &self,
        pdu: &str,
        port: &str,
        off: Option<Duration>,
    ) -> Result<CycleReport, ClientError> {
        let path = format!(
            "/api/v1/pdus/{}/ports/{}/cycle",
            encode_component(pdu),
            encode_component(port)
        );
        let body = CycleRequest {
            off_seconds: off.map(|d| d.as_secs_f64()),
        };
        // The request lasts the off delay plus the switching; give it room.
        let budget = off.unwrap_or(Duration::from_secs(3600)) + Duration::from_secs(120);
        let rb = self
            .api
            .request(Method::POST, &path)
            .json(&body)
            .timeout(budget);
        self.api.send(rb, &path).await
    }

    pub async fn history(
        &self,
        pdu: &str,
        port: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        self.api
            .get(&format!(
                "/api/v1/pdus/{}/ports/{}/history?limit={limit}",
                encode_component(pdu),
                encode_component(port)
            ))
            .await
    }
}
