package org.whispertorchserve;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.util.ApiUtils;

/**
 * GET /ping on the inference port: TorchServe's own answer (200 Healthy when every model
 * has its workers, 500 Unhealthy otherwise), except while serve.sh drains the server (the
 * file "draining" in $WHISPER_DRAIN_DIR exists): 503 Draining, so load balancers and
 * readiness probes stop routing requests here while those in flight finish.
 *
 * TorchServe looks up endpoints of plugins (--plugins-path) before its own routes, so this
 * class answers /ping in their place; serve.sh builds it into model-store/plugins/.
 */
@Endpoint(
        urlPattern = "ping",
        endpointType = EndpointTypes.INFERENCE,
        description = "TorchServe's health, or Draining while the server drains")
public class DrainAwarePing extends ModelServerEndpoint {
    @Override
    public void doGet(Request request, Response response, Context context) throws IOException {
        String folder = System.getenv("WHISPER_DRAIN_DIR");
        String status;
        int code;
        if (folder != null && Files.exists(Paths.get(folder, "draining"))) {
            status = "Draining";
            code = 503;
            response.setHeader("Retry-After", "5");
        } else if (ApiUtils.isModelHealthy()) {
            status = "Healthy";
            code = 200;
        } else {
            status = "Unhealthy";
            code = 500;
        }
        response.setStatus(code);
        response.setContentType("application/json");
        response.getOutputStream()
                .write(("{\n  \"status\": \"" + status + "\"\n}\n").getBytes(StandardCharsets.UTF_8));
    }
}
